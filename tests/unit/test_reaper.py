# SPDX-License-Identifier: LGPL-2.1-or-later
"""The per-VM reaper as the VM's leader (vmspawnd/reaper.py), run as the daemon runs it.

The child is `sleep` instead of QEMU, and the daemon's control socket and QEMU's QMP
monitor are small stand-ins served from a thread: fast seam tests of what the reaper does
with each signal. The real daemon and QEMU are exercised by the system tier (machinectl
poweroff/reboot/kill against a booted guest) and tests/integration.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import orphans_reaped
from vmspawnd.host.process import REAPER_SCRIPT, read_exit_status

RTMIN4 = int(signal.SIGRTMIN) + 4


class Reaper:
    def __init__(self, tmp: Path, *options: str) -> None:
        self.status = tmp / "qemu.exit"
        self.log = tmp / "reaper.log"
        ours, theirs = socket.socketpair()
        with open(self.log, "ab") as log, ours, theirs:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    REAPER_SCRIPT,
                    *options,
                    str(self.status),
                    str(theirs.fileno()),
                    "--",
                    "sleep",
                    "600",
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
            theirs.close()
            data, fds, _flags, _address = socket.recv_fds(ours, 64, 1)
        self.child = int(data)
        self.machined = socket.socket(fileno=fds[0]) if fds else None

    def signal(self, signo: int) -> None:
        os.kill(self.process.pid, signo)

    def child_alive(self) -> bool:
        try:
            with open(f"/proc/{self.child}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            return False

    def wait(self, timeout: float = 20) -> int | None:
        self.process.wait(timeout)
        return read_exit_status(self.status)

    def close(self) -> None:
        if self.machined is not None:
            self.machined.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child, signal.SIGKILL)
        self.process.wait(10)


@contextlib.contextmanager
def reaper(tmp: Path, *options: str) -> Iterator[Reaper]:
    started = Reaper(tmp, *options)
    try:
        yield started
    finally:
        started.close()


class StandIn:
    """An AF_UNIX server answering each connection with `answer(request_bytes)`; records requests."""

    def __init__(self, path: Path, answer: Callable[[socket.socket], bytes]) -> None:
        self.requests: list[bytes] = []
        self.seen = threading.Semaphore(0)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(self._answer(conn))
                self.seen.release()

    def next_request(self, timeout: float = 10) -> bytes:
        assert self.seen.acquire(timeout=timeout), "the reaper sent nothing"
        return self.requests[-1]

    def close(self) -> None:
        self._sock.close()


def varlink_answer(conn: socket.socket) -> bytes:
    """Stand-in for vmspawnd's io.systemd.MachineInstance: read one call, reply {}."""
    data = b""
    while b"\0" not in data:
        data += conn.recv(4096)
    conn.sendall(b'{"parameters": {}}\0')
    return data.split(b"\0")[0]


def qmp_answer(conn: socket.socket) -> bytes:
    """Stand-in for QEMU's QMP monitor: greeting, then {"return": {}} per command."""
    conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    commands: list[str] = []
    buffer = b""
    while len(commands) < 2:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            commands.append(json.loads(line)["execute"])
            conn.sendall(b'{"event": "POWERDOWN", "data": {}}\n{"return": {}}\n')
    return json.dumps(commands).encode()


def test_power_off_and_reboot_go_to_the_daemon_and_the_vm_runs_on(tmp_path: Path) -> None:
    daemon = StandIn(tmp_path / "control", varlink_answer)
    with reaper(tmp_path, f"--control={tmp_path / 'control'}", f"--qmp={tmp_path / 'qmp'}") as r:
        r.signal(RTMIN4)
        assert json.loads(daemon.next_request())["method"] == "io.systemd.MachineInstance.PowerOff"
        r.signal(signal.SIGINT)
        assert json.loads(daemon.next_request())["method"] == "io.systemd.MachineInstance.Reboot"
        assert r.child_alive() and r.process.poll() is None  # neither signal killed anything
    daemon.close()
    log = r.log.read_text()
    assert f"SIGRTMIN+4 from pid {os.getpid()}" in log and "powering the VM off" in log


def test_power_off_without_a_daemon_presses_the_button_over_qmp_then_escalates(tmp_path: Path) -> None:
    qemu = StandIn(tmp_path / "qmp", qmp_answer)
    with reaper(tmp_path, f"--control={tmp_path / 'absent'}", f"--qmp={tmp_path / 'qmp'}", "--deadline=1") as r:
        started = time.monotonic()
        r.signal(RTMIN4)
        assert json.loads(qemu.next_request()) == ["qmp_capabilities", "system_powerdown"]
        # `sleep` ignores the ACPI button, so after the deadline it gets SIGTERM.
        assert r.wait() == -signal.SIGTERM
        assert time.monotonic() - started >= 1
    qemu.close()
    assert "did not power off in time: sending SIGTERM" in r.log.read_text()


def test_power_off_with_nothing_reachable_terminates_at_once(tmp_path: Path) -> None:
    with reaper(tmp_path, f"--control={tmp_path / 'absent'}", f"--qmp={tmp_path / 'absent-too'}") as r:
        r.signal(RTMIN4)
        assert r.wait() == -signal.SIGTERM


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, int(signal.SIGRTMIN) + 7])
def test_other_signals_are_forwarded_to_qemu(tmp_path: Path, signo: int) -> None:
    with reaper(tmp_path) as r:
        r.signal(signo)
        assert r.wait() == -signo  # `sleep` dies of each, as the reaper passes it on


def test_qemu_dies_with_its_leader(tmp_path: Path) -> None:
    with orphans_reaped(), reaper(tmp_path) as r:
        r.signal(signal.SIGKILL)
        r.process.wait(10)
        # The orphaned child is ours now: its pidfd says when it died (bounded: a child that
        # missed its parent-death signal would live on as `sleep 600`).
        pidfd = os.pidfd_open(r.child)
        try:
            assert select.select([pidfd], [], [], 30)[0], "QEMU outlived its leader"
        finally:
            os.close(pidfd)
        pid, status = os.waitpid(r.child, os.WNOHANG)
        assert pid == r.child and os.waitstatus_to_exitcode(status) == -signal.SIGKILL  # the parent-death signal


def test_the_connection_to_machined_is_the_reapers_and_handed_over(tmp_path: Path) -> None:
    """machined takes the supervisor from the peer of the connection a VM is registered over:
    the reaper connects, and the daemon gets that connection with QEMU's pid."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "machined"))
    listener.listen(1)
    with listener, reaper(tmp_path, f"--machined={tmp_path / 'machined'}") as r:
        peer, _ = listener.accept()
        with peer:
            creds = peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            assert int.from_bytes(creds[:4], "little") == r.process.pid  # the reaper, not us
            assert r.machined is not None
            r.machined.sendall(b"hello")
            assert peer.recv(5) == b"hello"  # the same connection


def test_no_machined_no_connection(tmp_path: Path) -> None:
    with reaper(tmp_path, f"--machined={tmp_path / 'absent'}") as r:
        assert r.machined is None and r.child_alive()


def test_exit_status_is_recorded_and_signals_pipe_noise_is_dropped(tmp_path: Path) -> None:
    with reaper(tmp_path) as r:
        r.signal(signal.SIGPIPE)
        r.signal(signal.SIGWINCH)
        assert r.child_alive()
        os.kill(r.child, signal.SIGKILL)
        assert r.wait() == -signal.SIGKILL
