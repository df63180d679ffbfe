# SPDX-License-Identifier: LGPL-2.1-or-later
"""`vmspawnctl run`, the drop-in for systemd-vmspawn, against a real daemon and guest.

One boot per behaviour (there is no way to test "the guest powered off" twice on one VM).
"""

from __future__ import annotations

import contextlib
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
from typing import TypedDict, Unpack

import pytest

from tests.guest.build import Guest
from tests.support import (
    BOOT_TIMEOUT,
    MANAGER,
    Daemon,
    EventStream,
    make_runtime_dir,
    notify_as_guest,
    open_console,
    qemu_processes,
    start_daemon,
    stop_daemon,
    wait_notify,
)

pytestmark = pytest.mark.vm


def run_args(guest: Guest, name: str, mode: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vmspawnctl.main",
        "run",
        "-M",
        name,
        "--kvm=no",
        "--ram=256M",
        f"--linux={guest.kernel}",
        f"--initrd={guest.initrd}",
        *extra,
        f"vmspawnd_test.mode={mode}",
    ]


class Output:
    """Collects a child's stdout (a pipe or a pty master) and waits for patterns in it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = b""
        self.closed = False

    def pump(self, timeout: float) -> bool:
        """Read what is there within `timeout`; True if something was read."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # a pty master reads EIO once the child side is gone
            chunk = b""
        self.closed = not chunk
        self.data += chunk
        return bool(chunk)

    def expect(self, pattern: bytes, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.data):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"never saw {pattern!r}; got {self.data[-2000:]!r}"
            self.pump(remaining)
            assert not self.closed, f"output ended before {pattern!r}; got {self.data[-2000:]!r}"

    def finish(self, process: subprocess.Popen[bytes], timeout: float = BOOT_TIMEOUT) -> int:
        """Read to the end while waiting for `process`, so it never blocks on a full pipe."""
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise AssertionError(f"vmspawnctl run did not exit; output {self.data[-2000:]!r}")
            self.pump(0.2)
        while self.pump(0):
            pass
        return process.returncode


class PopenOptions(TypedDict, total=False):
    """What the tests pass on to subprocess.Popen."""

    stdin: int
    stdout: int
    stderr: int
    start_new_session: bool


@contextlib.contextmanager
def spawned(
    daemon: Daemon, argv: list[str], env: dict[str, str] | None = None, **kwargs: Unpack[PopenOptions]
) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, VMSPAWN_ADDRESS=daemon.address, **(env or {}))
    process = subprocess.Popen(argv, env=env, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def names(daemon: Daemon) -> set[str]:
    return {m["name"] for m in daemon.call("List")["machines"]}


def test_run_in_foreground_returns_0_after_poweroff_and_notifies(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(str(tmp_path / "notify"))
    with (
        notify,
        spawned(
            daemon,
            run_args(guest, "fg", "poweroff"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"NOTIFY_SOCKET": str(tmp_path / "notify")},
        ) as process,
    ):
        assert process.stdout is not None and process.stderr is not None  # piped
        out = Output(process.stdout.fileno())
        code = out.finish(process)
        stderr = process.stderr.read().decode()
        status = wait_notify(notify, "STATUS=VM started.", 5)
        assert re.search(r"^X_VMSPAWN_LEADER_PID=\d+$", status, re.M), status
        wait_notify(notify, "READY=1", 5)
    assert code == 0, stderr
    assert b"VMSPAWND-TEST: powering-off" in out.data
    assert f"Spawning VM fg on {guest.kernel}.\n" in stderr
    assert "Press Ctrl-] three times within 1s to kill VM.\n" in stderr  # the default console: interactive
    assert "fg" not in names(daemon)  # like vmspawn, nothing is left behind


def test_run_fails_when_qemu_fails(daemon: Daemon, guest: Guest) -> None:
    result = subprocess.run(
        run_args(guest, "broken", "poweroff", "--cpus=99999"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, VMSPAWN_ADDRESS=daemon.address),
    )
    assert result.returncode != 0
    assert "failed to start" in result.stderr and "99999" in result.stderr, result.stderr
    assert "broken" not in names(daemon)


def test_sigterm_powers_the_vm_off(daemon: Daemon, guest: Guest) -> None:
    with spawned(
        daemon,
        run_args(guest, "termed", "wait", "--console=read-only"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None  # piped
        out = Output(process.stdout.fileno())
        out.expect(rb"VMSPAWND-TEST: acpid-running")
        process.send_signal(signal.SIGTERM)
        code = out.finish(process)
        stderr = process.stderr.read().decode()
    assert code == 0
    # Like vmspawn, the escape-key hint only for an interactive console: read-only takes no keys.
    assert f"Spawning VM termed on {guest.kernel}.\n" in stderr and "Ctrl-]" not in stderr, stderr
    assert b"VMSPAWND-TEST: acpi-powerdown" in out.data  # it went through ACPI, not a kill
    assert "termed" not in names(daemon)


def test_sigkill_of_run_terminates_the_vm(daemon: Daemon, guest: Guest) -> None:
    with spawned(daemon, run_args(guest, "orphan", "wait"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None  # piped
        out = Output(process.stdout.fileno())
        out.expect(rb"VMSPAWND-TEST: acpid-running")
        pid = daemon.call("Describe", {"name": "orphan"})["machine"]["qemu"]["pid"]
        process.kill()
        process.wait()
    # No event announces a removal: poll List, bounded.
    deadline = time.monotonic() + 60
    while "orphan" in names(daemon):
        assert time.monotonic() < deadline, "the daemon did not end the VM of a killed `run`"
        time.sleep(0.2)
    assert pid not in qemu_processes()


def test_run_on_a_terminal_escape_kills_vm_and_restores_terminal(daemon: Daemon, guest: Guest) -> None:
    master, slave = pty.openpty()
    before = subprocess.run(["stty", "-a"], stdin=slave, capture_output=True, text=True, check=True).stdout
    try:
        with spawned(
            daemon, run_args(guest, "tty", "wait"), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        ) as process:
            out = Output(master)
            out.expect(rb"guest# ")
            assert b"\x1b[48;2;" in out.data  # vmspawn's default tint
            os.write(master, b"echo on-tty-$((4*4))\r")
            out.expect(rb"on-tty-16")
            os.write(master, b"\x1d\x1d\x1d")
            code = out.finish(process)
        after = subprocess.run(["stty", "-a"], stdin=slave, capture_output=True, text=True, check=True).stdout
    finally:
        os.close(master)
        os.close(slave)
    assert code == 0, out.data[-2000:]
    assert after == before
    assert out.data.rstrip(b"\r\n").endswith(b"\x1b[0m\x1b[K") or b"\x1b[0m\x1b[K" in out.data
    assert "tty" not in names(daemon)


def test_run_returns_the_guests_exit_status(guest: Guest) -> None:
    """EXIT_STATUS= over the notify channel becomes `run`'s exit status, as with vmspawn.

    No vsock here: this daemon uses the AF_UNIX stand-in, and the test writes what the
    guest's systemd writes before it powers off (the stand-in of this file).
    """
    daemon = start_daemon(make_runtime_dir(), "--notify-transport=unix")
    try:
        with spawned(daemon, run_args(guest, "exiting", "wait"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as process:
            assert process.stdout is not None  # piped
            out = Output(process.stdout.fileno())
            out.expect(rb"VMSPAWND-TEST: acpid-running")
            address = str(daemon.call("Describe", {"name": "exiting"})["machine"]["notifyAddress"])
            notify_as_guest(address, b"READY=1\nEXIT_STATUS=42\n")
            daemon.call("PowerOff", {"name": "exiting"})
            code = out.finish(process)
        assert b"VMSPAWND-TEST: acpi-powerdown" in out.data
        assert code == 42
    finally:
        stop_daemon(daemon)


def test_native_console_relays_qemus_monitor(daemon: Daemon, guest: Guest) -> None:
    """--console=native: QEMU's multiplexed console; Ctrl-a c switches to its monitor."""
    daemon.call(
        "Spawn",
        {
            "spec": {
                "name": "native",
                "kvm": False,
                "ram": 256 << 20,
                "console": "native",
                "linux": str(guest.kernel),
                "initrds": [str(guest.initrd)],
                "kernelCmdline": ["vmspawnd_test.mode=wait"],
            }
        },
    )
    try:
        console = open_console(daemon.address, "native", "interactive", history=65536)
        with console:
            out = Output(console.fileno())
            out.expect(rb"VMSPAWND-TEST: acpid-running")
            console.sendall(b"\x01c")  # Ctrl-a c: to the monitor
            out.expect(rb"\(qemu\) ")
            console.sendall(b"info status\r")
            out.expect(rb"VM status: running")
            console.sendall(b"\x01c")  # and back to the guest
            console.sendall(b"echo native-$((6*7))\r")
            out.expect(rb"native-42")
    finally:
        daemon.call("Terminate", {"name": "native"})
        daemon.call("Remove", {"name": "native"})


@pytest.mark.parametrize("frozen", [False, True], ids=["during-the-start", "before-the-daemon-read-the-call"])
def test_holder_hanging_up_during_the_start_leaves_no_vm(daemon: Daemon, guest: Guest, frozen: bool) -> None:
    """SpawnAndHold binds the VM to the call from the start: a caller gone while the VM is
    still starting (run killed right after sending) leaves nothing; the name is free.

    `frozen`: the daemon is SIGSTOPped while the caller connects, sends and closes, so it
    reads the call and the hang-up together (its hang-up watch is not armed yet; only the
    failed first reply tells it the caller is gone)."""
    spec = {
        "name": "early",
        "kvm": False,
        "ram": 256 << 20,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    before = set(qemu_processes())
    with EventStream(daemon) as events:
        if frozen:
            daemon.process.send_signal(signal.SIGSTOP)
        try:
            with daemon.connect() as conn:
                conn.send(f"{MANAGER}.SpawnAndHold", {"spec": spec}, more=True)
        finally:
            if frozen:
                daemon.process.send_signal(signal.SIGCONT)
        # Hung up before any reply: the start goes on, and then the VM is ended and removed.
        states = [events.wait_state("early", "running", "failed")["data"]["state"]]
        events.wait_event("early", "Removed")
    assert states == ["running"]
    assert "early" not in names(daemon)
    assert set(qemu_processes()) <= before  # its QEMU is gone (reaped: the reaper saw it exit)
