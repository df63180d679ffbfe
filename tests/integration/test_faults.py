# SPDX-License-Identifier: LGPL-2.1-or-later
"""Faults end in a defined state with a reason, and leak nothing.

(QEMU or a helper killed: test_helpers.py; a client hanging up mid-call and garbage on the
socket: test_spine_errors.py; QEMU stopped while calls wait on it: test_lifecycle.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Daemon, no_leaks, qemu_processes

pytestmark = pytest.mark.vm

MIB = 1024 * 1024


def spawn(daemon: Daemon, guest, name: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    spec = {"name": name, "kvm": False, "ram": 128 * MIB, "tpm": False, "linux": str(guest.kernel),
            "initrds": [str(guest.initrd)], "kernelCmdline": ["vmspawnd_test.mode=wait"]}
    return daemon.call("Spawn", {"spec": spec})["machine"]  # type: ignore[return-value]


def test_terminate_reaches_a_stopped_qemu(daemon: Daemon, guest) -> None:  # type: ignore[no-untyped-def]
    with no_leaks(daemon):
        machine = spawn(daemon, guest, "frozen")
        pid = machine["qemu"]["pid"]  # type: ignore[index]
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


def test_failed_writes_in_the_runtime_directory_do_not_wedge_the_vm(daemon: Daemon, guest, immutable: list[Path]) -> None:  # type: ignore[no-untyped-def]
    with no_leaks(daemon):
        machine = spawn(daemon, guest, "readonlydir")
        directory = Path(str(machine["runtimeDirectory"]))
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        immutable.append(directory)
        # state.json cannot be replaced now: calls still work, the failure is logged.
        assert daemon.call("Pause", {"name": "readonlydir"})["machine"]["paused"] is True  # type: ignore[index]
        assert daemon.call("Resume", {"name": "readonlydir"})["machine"]["paused"] is False  # type: ignore[index]
        final = daemon.call("Terminate", {"name": "readonlydir"})["machine"]
        assert final["state"] == "stopped"
        assert machine["qemu"]["pid"] not in qemu_processes()  # type: ignore[index]
        log = daemon.log()
        assert "readonlydir: could not write state.json" in log
        assert "readonlydir: could not remove" in log
        subprocess.run(["chattr", "-i", str(directory)], check=True)
        daemon.call("Remove", {"name": "readonlydir"})
        assert not directory.exists()
