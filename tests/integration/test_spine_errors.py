# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bad input gets a typed error (or a clean close), the daemon keeps serving, and a failed
start leaves nothing behind: no process, no socket, no runtime directory, no fd.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from vmspawnctl.varlink import VarlinkError

from tests.guest.build import Guest
from tests.support import MANAGER, Daemon, EventStream, no_leaks, qemu_processes

MIB = 1024 * 1024


def spawn_error(daemon: Daemon, spec: dict[str, object]) -> VarlinkError:
    with pytest.raises(VarlinkError) as info:
        daemon.call("Spawn", {"spec": spec})
    return info.value


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    """A file that passes the path checks; these tests fail before QEMU would read it."""
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"not really a kernel")
    return path


def test_missing_image_is_invalid_spec(daemon: Daemon, tmp_path: Path) -> None:
    with no_leaks(daemon):
        err = spawn_error(daemon, {"name": "noimage", "image": str(tmp_path / "missing.raw")})
    assert err.name == f"{MANAGER}.InvalidSpec"
    assert err.parameters["field"] == "image"
    assert "does not exist" in str(err.parameters["reason"])


def test_kernel_that_is_a_directory(daemon: Daemon, tmp_path: Path) -> None:
    with no_leaks(daemon):
        err = spawn_error(daemon, {"name": "kdir", "linux": str(tmp_path)})
    assert err.parameters == {"field": "linux", "reason": f"{tmp_path} is a directory, not a file"}


def test_kernel_that_is_a_dangling_symlink(daemon: Daemon, tmp_path: Path) -> None:
    link = tmp_path / "vmlinuz"
    link.symlink_to(tmp_path / "nowhere")
    with no_leaks(daemon):
        err = spawn_error(daemon, {"name": "kdangling", "linux": str(link)})
    assert err.parameters["field"] == "linux"
    assert "dangling symbolic link" in str(err.parameters["reason"])


def test_unknown_field_in_raw_call(daemon: Daemon, kernel: Path) -> None:
    with no_leaks(daemon):
        err = spawn_error(daemon, {"name": "x", "linux": str(kernel), "colour": "blue"})
    assert err.name == "org.varlink.service.InvalidParameter"
    assert err.parameters["parameter"] == "spec"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "bad name!", "linux": "/k"}, "name"),
        ({"name": "rel", "linux": "relative/vmlinuz"}, "linux"),
        ({"name": "noram", "linux": "/k", "ram": 0}, "ram"),
        ({"name": "con", "linux": "/k", "console": "tty"}, "console"),
        ({"name": "initrd", "initrds": ["/i"]}, "initrds"),
        ({"name": "nocpu", "linux": "/k", "cpus": "0"}, "cpus"),
        ({"name": "nothing"}, "image"),
    ],
)
def test_invalid_spec_values_name_their_field(daemon: Daemon, spec: dict[str, object], field: str) -> None:
    err = spawn_error(daemon, spec)
    assert err.name == f"{MANAGER}.InvalidSpec"
    assert err.parameters["field"] == field


def test_cli_refuses_bad_ram_without_contacting_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    env = dict(os.environ, VMSPAWN_ADDRESS=str(tmp_path / "no-daemon-here"))
    result = subprocess.run(
        [sys.executable, "-m", "vmspawnctl.main", "start", "--ram=12Q", "--linux=/k"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--ram" in result.stderr and "12Q" in result.stderr and "K, M, G" in result.stderr
    assert "cannot connect" not in result.stderr


@pytest.mark.vm
def test_duplicate_name_is_refused_and_qemu_failure_is_reported(daemon: Daemon, guest: Guest) -> None:
    spec = {
        "name": "dup",
        "kvm": False,
        "ram": 128 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    daemon.call("Spawn", {"spec": spec})
    try:
        with no_leaks(daemon):
            err = spawn_error(daemon, spec)
            assert err.name == f"{MANAGER}.MachineExists"
            assert err.parameters == {"name": "dup"}
            # QEMU refuses an impossible -smp: the failure and QEMU's words reach the client.
            # (A well-formed one: zero and negative counts are refused before QEMU, by the spec.)
            err = spawn_error(daemon, {**spec, "name": "badsmp", "cpus": "2,maxcpus=1"})
            assert err.name == f"{MANAGER}.StartFailed"
            assert err.parameters["step"] in ("qmp", "cont")
            assert "QEMU exited with status 1" in str(err.parameters["message"])
            assert "smp" in str(err.parameters["stderrTail"]).lower() or "cpu" in str(err.parameters["stderrTail"]).lower()
    finally:
        daemon.call("Terminate", {"name": "dup"})
        daemon.call("Remove", {"name": "dup"})


def test_garbage_bytes_get_a_typed_error_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    with no_leaks(daemon):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(daemon.address)
            sock.sendall(b"\xff\xfe this is not json\0")
            reply = sock.recv(4096)
            assert reply.endswith(b"\0")
            assert json.loads(reply[:-1])["error"] == f"{MANAGER}.ProtocolViolation"
            assert sock.recv(4096) == b""  # and the daemon closed that connection
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(daemon.address)
            sock.sendall(b'["an array, not a call"]\0')
            assert json.loads(sock.recv(4096)[:-1])["error"] == f"{MANAGER}.ProtocolViolation"
        assert daemon.call("List")["machines"] == []


@pytest.mark.slow  # 12.5 MiB through the daemon: 2.5 s on an idle machine, over 10 s on a busy one
def test_oversized_frame_is_closed(daemon: Daemon) -> None:
    with no_leaks(daemon):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(daemon.address)
            chunk = b"x" * 65536
            try:
                for _ in range(200):  # 12.5 MiB without a NUL terminator
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            else:
                assert sock.recv(4096) == b""
        assert daemon.call("List")["machines"] == []


@pytest.mark.vm
def test_client_hanging_up_mid_spawn_leaves_a_consistent_vm(daemon: Daemon, guest: Guest) -> None:
    spec = {
        "name": "hangup",
        "kvm": False,
        "ram": 128 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    with EventStream(daemon) as events:
        with daemon.connect() as conn:
            conn.send(f"{MANAGER}.Spawn", {"spec": spec})
        # The start completes without the client.
        events.wait_state("hangup", "ready", "failed")
    machine = daemon.call("Describe", {"name": "hangup"})["machine"]
    assert machine["state"] == "ready"
    assert machine["qemu"]["pid"] in qemu_processes()
    daemon.call("Terminate", {"name": "hangup"})
    daemon.call("Remove", {"name": "hangup"})


def test_unprivileged_peer_gets_permission_denied(daemon: Daemon) -> None:
    # Import before dropping privileges: the interpreter may live under root's home.
    code = (
        "import os, sys\n"
        "from vmspawnctl.varlink import Connection, VarlinkError\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    Connection({daemon.address!r}).call('{MANAGER}.List')\n"
        "except VarlinkError as e:\n"
        "    print(e.name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"{MANAGER}.PermissionDenied", result.stderr
    # Introspection stays public, as on systemd's sockets.
    info = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from vmspawnctl.varlink import Connection; os.setgid(65534); os.setuid(65534);"
            f"print(Connection({daemon.address!r}).call('org.varlink.service.GetInfo')['product'])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.stdout.strip() == "vmspawnd", info.stderr
