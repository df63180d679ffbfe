# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon as a service: readiness, socket activation, one instance per runtime dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import Connection

from tests.guest.build import Guest
from tests.support import Daemon, make_runtime_dir, start_daemon, wait_notify


@pytest.fixture
def runtime() -> Iterator[Path]:
    path = make_runtime_dir()
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def test_second_daemon_on_same_runtime_dir_fails_clearly(daemon: Daemon) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmspawnd.daemon",
            f"--runtime-dir={daemon.runtime_dir}",
            f"--listen={daemon.runtime_dir.parent}/other.sock",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"already uses runtime directory {daemon.runtime_dir}" in result.stderr
    assert str(daemon.process.pid) in result.stderr
    assert daemon.call("List")["machines"] == []  # the first one is unaffected


def test_sigterm_sends_stopping_and_exits_cleanly(runtime: Path) -> None:
    d = start_daemon(runtime)
    d.process.send_signal(signal.SIGTERM)
    wait_notify(d.notify, "STOPPING=1", 30)
    assert d.process.wait(timeout=30) == 0
    d.notify.close()


@pytest.mark.vm
def test_socket_activation_with_named_fd(runtime: Path, guest: Guest) -> None:
    """Under the real systemd-socket-activate, with the fd named 'varlink' among others."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = runtime / "activated.sock"
    other = runtime / "other.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(str(runtime / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(runtime / "notify"))
    process = subprocess.Popen(
        [
            activate,
            "-l",
            str(other),
            "-l",
            str(path),
            "--fdname=other:varlink",
            "-E",
            "NOTIFY_SOCKET",
            sys.executable,
            "-m",
            "vmspawnd.daemon",
            f"--runtime-dir={runtime}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # systemd-socket-activate starts the service on the first connection.
        client = subprocess.run(
            [sys.executable, "-m", "varlink.cli", "call", f"unix:{path}/io.vmspawnd.Manager.List", "{}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(client.stdout) == {"machines": []}, client.stdout + client.stderr
        wait_notify(notify, "READY=1", 30)
        assert not (runtime / "io.vmspawnd.Manager").exists()  # it did not bind its own socket
        # LISTEN_* must not leak into QEMU, which would think it was socket-activated.
        spec = {
            "name": "activated",
            "kvm": False,
            "ram": 128 << 20,
            "linux": str(guest.kernel),
            "initrds": [str(guest.initrd)],
            "kernelCmdline": ["vmspawnd_test.mode=wait"],
        }
        with Connection(str(path), timeout=120) as conn:
            machine = conn.call("io.vmspawnd.Manager.Spawn", {"spec": spec})["machine"]
            environ = Path(f"/proc/{machine['qemu']['pid']}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(b"LISTEN_")]
            conn.call("io.vmspawnd.Manager.Terminate", {"name": "activated"})
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        notify.close()
