# SPDX-License-Identifier: LGPL-2.1-or-later
"""The console end to end: one real guest (busybox shell on hvc0) shared by the module.

Clients are the stdlib OpenConsole reader and the real `vmspawnctl console` on a pty;
every expected string is computed by the guest's shell ($((...))), so seeing it proves
the input went in and the output came out.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import JsonObject

from tests.guest.build import Guest
from tests.support import BOOT_TIMEOUT, Console, Daemon, open_console

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
NAME = "con"
ESCAPE3 = b"\x1d\x1d\x1d"


@pytest.fixture(scope="module")
def vm(daemon: Daemon, guest: Guest) -> Iterator[JsonObject]:
    daemon.call(
        "Spawn",
        {
            "spec": {
                "name": NAME,
                "kvm": False,
                "ram": 256 * MIB,
                "linux": str(guest.kernel),
                "initrds": [str(guest.initrd)],
                "kernelCmdline": ["vmspawnd_test.mode=wait"],
            }
        },
    )
    machine = daemon.call("Describe", {"name": NAME})["machine"]
    with Console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
        console.wait_for(r"guest# ")
    yield machine
    daemon.call("Terminate", {"name": NAME})
    daemon.call("Remove", {"name": NAME})


def read_until(sock: socket.socket, pattern: bytes, timeout: float = 60.0) -> bytes:
    """Read `sock` until `pattern` (a regex) shows up; returns everything read.

    Each new chunk is searched with a 4 KiB overlap, not the whole buffer again: a
    1.3 MB flood arrives in thousands of small chunks, and rescanning made it quadratic."""
    regex = re.compile(pattern)
    seen = bytearray()
    searched = 0
    deadline = time.monotonic() + timeout
    while not regex.search(seen, max(0, searched - 4096)):
        searched = len(seen)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {pattern!r} within {timeout}s; got {bytes(seen[-2000:])!r}")
        ready, _, _ = select.select([sock], [], [], remaining)
        if ready:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"console closed before {pattern!r}; got {bytes(seen[-2000:])!r}")
            seen += chunk
    return bytes(seen)


def type_line(daemon: Daemon, line: str) -> None:
    """Type one command line as the interactive client (taking the console over)."""
    writer = open_console(daemon.address, NAME, "interactive", force=True)
    try:
        writer.sendall(line.encode() + b"\r")
    finally:
        writer.close()


def test_stdlib_client_receives_output_produced_after_attach(daemon: Daemon, vm: JsonObject) -> None:
    watcher = open_console(daemon.address, NAME, "read-only")
    try:
        type_line(daemon, "echo after-attach-$((6*7))")
        read_until(watcher, rb"after-attach-42")
    finally:
        watcher.close()


def test_screenshot_of_a_vm_without_display_is_not_supported(daemon: Daemon, vm: JsonObject) -> None:
    result = daemon.ctl("screenshot", NAME, "unused.png")
    assert result.returncode != 0
    assert "not supported" in result.stderr and "--console=gui" in result.stderr
    assert not Path("unused.png").exists()


def test_second_interactive_client_is_refused_then_forced(daemon: Daemon, vm: JsonObject) -> None:
    first = open_console(daemon.address, NAME, "interactive")
    try:
        with daemon.connect() as conn:
            with pytest.raises(Exception) as refused:
                conn.call("io.vmspawnd.Manager.OpenConsole", {"name": NAME, "mode": "interactive"})
        assert getattr(refused.value, "short_name", "") == "ConsoleBusy"
        second = open_console(daemon.address, NAME, "interactive", force=True)
        told = read_until(first, rb"took over")
        first.settimeout(30)
        while first.recv(65536):  # then end of stream: the first client is detached
            pass
        assert b"another client took over" in told
        second.sendall(b"echo forced-$((5*5))\r")
        read_until(second, rb"forced-25")
        second.close()
    finally:
        first.close()


# --- a real terminal ---------------------------------------------------------------------


class Terminal:
    """`vmspawnctl console` on a pty of its own; the test is the user at the keyboard."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        self.master, self.slave = pty.openpty()
        self.before = stty(self.slave)
        env = dict(os.environ, VMSPAWN_ADDRESS=daemon.address)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmspawnctl.main", *args],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env=env,
            start_new_session=True,
        )
        self.output = b""

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 60.0) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not regex.search(self.output):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"terminal never showed {pattern!r}; got {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    raise AssertionError(f"terminal closed before {pattern!r}; got {self.output[-2000:]!r}") from None

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the client to exit (reading the pty meanwhile so it never blocks)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"vmspawnctl console did not exit; output {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                self.output += os.read(self.master, 65536)
        assert stty(self.slave) == self.before, "the terminal was not restored"
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


def stty(fd: int) -> str:
    """`stty -a` of the terminal, as a user would compare it."""
    return subprocess.run(["stty", "-a"], stdin=fd, capture_output=True, text=True, check=True).stdout


def test_terminal_types_detaches_reattaches_and_is_taken_over(daemon: Daemon, vm: JsonObject) -> None:
    first = Terminal(daemon, "console", NAME)
    try:
        first.expect(rb"Connected to con")
        assert stty(first.slave) != first.before  # raw while attached
        first.type(b"echo typed-$((3+4))\r")
        first.expect(rb"typed-7")
        first.type(ESCAPE3)
        assert first.wait() == 0
        assert b"Detached" in first.output
    finally:
        first.close()
    assert daemon.call("Describe", {"name": NAME})["machine"]["state"] == "ready"

    again = Terminal(daemon, "console", NAME)
    try:
        again.expect(rb"typed-7")  # history replayed on attach
        busy = daemon.ctl("console", NAME)
        assert busy.returncode == 1 and "--force" in busy.stderr, busy.stderr
        thief = Terminal(daemon, "console", "--force", NAME)
        try:
            thief.expect(rb"Connected to con")
            again.expect(rb"another client took over")
            assert again.wait() == 0
            thief.type(b"echo thief-$((8*8))\r")
            thief.expect(rb"thief-64")
            os.kill(thief.process.pid, signal.SIGTERM)  # a signal is an exit path too
            thief.wait()
        finally:
            thief.close()
    finally:
        again.close()

    log = daemon.ctl("log", NAME)
    assert log.returncode == 0 and "thief-64" in log.stdout
    last = daemon.ctl("log", "-n", "3", NAME)
    assert len(last.stdout.splitlines()) <= 3


# Last in the module, and the module's only flood: after ~600 KB of output this guest
# kernel (Debian 6.1, virtio_console under TCG) sometimes stops taking console input.
# That happens with plain QEMU and no vmspawnd at all (docs/architecture.md, "Console"),
# so nothing is typed after it; the guest's liveness shows in output it makes later.
def test_flood_rotates_history_and_drops_only_the_slow_reader(daemon: Daemon, vm: JsonObject) -> None:
    """A watcher that never reads is dropped; the guest and the other clients run on;
    the history on disk stays under its cap (console.log + console.log.1, 1 MiB each)."""
    log = Path(str(vm["consoleLog"]))
    slow = open_console(daemon.address, NAME, "read-only")
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # and it never reads
    fast = open_console(daemon.address, NAME, "read-only")
    try:
        # ~2 MB of output: far beyond the slow client's buffers and the daemon's cap,
        # and past the history's cap; then the guest keeps printing, once a second.
        # `stty -opost` and the pipe make the guest write in pages: with ONLCR every line
        # is two tty writes, each a synchronous virtio-console kick, which under TCG
        # limits the guest to ~15 KB/s (measured; the daemon side is not the bottleneck).
        type_line(
            daemon,
            "stty -opost; seq 1 300000 | cat; stty opost; echo flood-done-$((2*21));"
            " for i in 1 2 3; do sleep 1; echo tick-$((i*11)); done",
        )
        seen = read_until(fast, rb"flood-done-42", timeout=BOOT_TIMEOUT)  # a hang detector: ~5 s here
        assert b"\n299999\n" in seen
        # The slow client was cut off (end of stream after what it had buffered).
        slow.settimeout(30)
        total = 0
        while chunk := slow.recv(65536):
            total += len(chunk)
        assert total < len(seen) // 2
        assert "stopped reading" in daemon.log()
        # The guest runs on, and its output still reaches the other client.
        after = read_until(fast, rb"tick-33")
        assert re.search(rb"tick-11.*tick-22.*tick-33", after, re.DOTALL)
    finally:
        slow.close()
        fast.close()
    rotated = log.with_name(log.name + ".1")
    assert rotated.exists()
    assert log.stat().st_size <= MIB and rotated.stat().st_size <= MIB
    assert "flood-done-42" in daemon.ctl("log", NAME).stdout
