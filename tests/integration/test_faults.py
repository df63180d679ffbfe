# SPDX-License-Identifier: LGPL-2.1-or-later
"""Faults end in a defined state with a reason, and leak nothing.

The QMP disconnect is produced from outside: the test takes a duplicate of the daemon's
QMP socket with pidfd_getfd(2) and shuts it down, as a broken connection would.

(QEMU or a helper killed: test_helpers.py; a client hanging up mid-call and garbage on the
socket: test_spine_errors.py; QEMU stopped while calls wait on it: test_lifecycle.py.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import JsonObject

from tests.guest.build import Guest
from tests.support import Daemon, EventStream, no_leaks, qemu_processes

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
SYS_pidfd_getfd = 438


def spawn(daemon: Daemon, guest: Guest, name: str) -> JsonObject:
    spec = {
        "name": name,
        "kvm": False,
        "ram": 128 * MIB,
        "tpm": False,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    machine: JsonObject = daemon.call("Spawn", {"spec": spec})["machine"]
    return machine


def test_terminate_reaches_a_stopped_qemu(daemon: Daemon, guest: Guest) -> None:
    with no_leaks(daemon):
        machine = spawn(daemon, guest, "frozen")
        pid = machine["qemu"]["pid"]
        os.kill(pid, signal.SIGSTOP)  # QMP gets no answer, SIGTERM stays pending
        final = daemon.call("Terminate", {"name": "frozen"})["machine"]
        assert final["state"] == "stopped"
        assert final["reason"] == "terminated on request"
        assert final["exitSignal"] == signal.SIGKILL  # the last rung of the ladder
        assert pid not in qemu_processes()
        daemon.call("Remove", {"name": "frozen"})


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Directories made immutable (chattr +i: even root cannot write there) during a test."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_failed_writes_in_the_runtime_directory_do_not_wedge_the_vm(daemon: Daemon, guest: Guest, immutable: list[Path]) -> None:
    with no_leaks(daemon):
        machine = spawn(daemon, guest, "readonlydir")
        directory = Path(str(machine["runtimeDirectory"]))
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        immutable.append(directory)
        # state.json cannot be replaced now: calls still work, the failure is logged.
        assert daemon.call("Pause", {"name": "readonlydir"})["machine"]["paused"] is True
        assert daemon.call("Resume", {"name": "readonlydir"})["machine"]["paused"] is False
        final = daemon.call("Terminate", {"name": "readonlydir"})["machine"]
        assert final["state"] == "stopped"
        assert machine["qemu"]["pid"] not in qemu_processes()
        log = daemon.log()
        assert "readonlydir: could not write state.json" in log
        assert "readonlydir: could not remove" in log
        subprocess.run(["chattr", "-i", str(directory)], check=True)
        daemon.call("Remove", {"name": "readonlydir"})
        assert not directory.exists()


def daemon_qmp_socket(daemon: Daemon, qmp_path: str) -> socket.socket:
    """A duplicate of the daemon's end of its QMP connection (pidfd_getfd, root only).

    QEMU's end carries the socket path in `ss`; its peer inode is the daemon's socket.
    """
    listing = subprocess.run(["ss", "-xH"], capture_output=True, text=True, check=True).stdout
    peers = {line.split()[7] for line in listing.splitlines() if len(line.split()) >= 8 and line.split()[4] == qmp_path}
    assert len(peers) == 1, listing
    peer = peers.pop()
    for fd in os.listdir(f"/proc/{daemon.process.pid}/fd"):
        if os.readlink(f"/proc/{daemon.process.pid}/fd/{fd}") == f"socket:[{peer}]":
            libc = ctypes.CDLL(None, use_errno=True)
            pidfd = os.pidfd_open(daemon.process.pid)
            try:
                dup = libc.syscall(SYS_pidfd_getfd, pidfd, int(fd), 0)
            finally:
                os.close(pidfd)
            assert dup >= 0, os.strerror(ctypes.get_errno())
            return socket.socket(fileno=dup)
    raise AssertionError("the daemon holds no QMP connection")


def test_qmp_connection_lost_while_qemu_runs_is_reconnected(daemon: Daemon, guest: Guest) -> None:
    with no_leaks(daemon):
        machine = spawn(daemon, guest, "qmpdrop")
        with EventStream(daemon, "qmpdrop") as events:
            with daemon_qmp_socket(daemon, str(machine["qmpAddress"])) as conn:
                conn.shutdown(socket.SHUT_RDWR)  # the daemon's QMP connection sees EOF
            events.wait_event("qmpdrop", "QmpDisconnected")
            events.wait_event("qmpdrop", "QmpReconnected")
            assert daemon.call("Pause", {"name": "qmpdrop"})["machine"]["paused"] is True
            events.wait_event("qmpdrop", "STOP")  # events flow on the new session
        assert "QMP connection lost while QEMU runs; reconnecting" in daemon.log()
        assert daemon.call("Describe", {"name": "qmpdrop"})["machine"]["state"] == "ready"
        daemon.call("Terminate", {"name": "qmpdrop"})
        daemon.call("Remove", {"name": "qmpdrop"})
