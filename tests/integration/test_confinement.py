# SPDX-License-Identifier: LGPL-2.1-or-later
"""Least privilege on the system instance (docs/security.md), proven on a booted VM.

The daemon under test runs as root, so it confines: QEMU and swtpm run as the VM's own
uid, without capabilities, QEMU under seccomp. The test talks to that QEMU through a
second QMP monitor of its own (`-qmp unix:…` in $SYSTEMD_VMSPAWN_QEMU_EXTRA's spec field,
on a socket in a directory the VM's uid may write): what QEMU may open there is what a
guest that escaped into QEMU could open.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.build import Guest
from tests.support import (
    Console,
    Daemon,
    EventStream,
    kill_leftovers,
    make_runtime_dir,
    no_leaks,
    orphans_reaped,
    qemu_processes,
    start_daemon,
    stop_daemon,
    waiting_spec,
)
from vmspawnd.host.process import describe_process

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def root_only_file(path: Path, size: int = MIB) -> Path:
    """A file only root may open (0600 root:root)."""
    with open(path, "wb") as f:
        f.truncate(size)
    os.chown(path, 0, 0)
    path.chmod(0o600)
    return path


class Qmp:
    """A minimal QMP client on the test's own monitor (line-delimited JSON)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("r")
        assert "QMP" in json.loads(self.reader.readline())
        assert "return" in self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> dict[str, object]:
        message: dict[str, object] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("QEMU closed its monitor")
            reply: dict[str, object] = json.loads(line)
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def qmp_dir() -> Iterator[Path]:
    """Where the confined QEMU may create the test's monitor socket (the VM's uid is not
    known before the start, so the directory is world-writable, sticky like /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="vmspawnd-qmp-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_qemu_and_swtpm_run_unprivileged_sandboxed_and_open_only_what_the_daemon_passed(
    daemon: Daemon, guest: Guest, tmp_path: Path, qmp_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only the system instance (root) confines its VMs")
    root, bind = tmp_path / "rootdir", tmp_path / "bind"
    root.mkdir()
    bind.mkdir()
    (root / "marker").write_text("root-share-marker\n")
    tmp_path.chmod(0o700)  # the caller's files lie below a directory the VM's uid cannot enter
    # -D excludes --image: the disks the spec names are extra drives (-blockdev, by fd too).
    image = root_only_file(tmp_path / "first.raw")
    drive = root_only_file(tmp_path / "second.raw", 2 * MIB)
    secret = root_only_file(tmp_path / "secret.raw")
    qmp_path = qmp_dir / "test.qmp"
    spec = waiting_spec(
        guest,
        "confined",
        directory=str(root),
        binds=[{"source": str(bind), "target": "/mnt/bind", "readOnly": False}],
        tpm=True,
        extraDrives=[str(image), str(drive)],
        qemuExtra=["-qmp", f"unix:{qmp_path},server=on,wait=off"],
    )
    with no_leaks(daemon):
        machine = daemon.call("Spawn", {"spec": spec})["machine"]
        qemu = proc_status(int(machine["qemu"]["pid"]))
        swtpm = proc_status(int(machine["helpers"]["swtpm"]["pid"]))
        uid = int(qemu["Uid"].split()[0])

        # QEMU: the VM's own uid=gid (real, effective, saved, fs), no groups, no
        # capability in any set, no_new_privs, and a seccomp filter (mode 2).
        assert uid != 0 and qemu["Uid"].split() == [str(uid)] * 4 and qemu["Gid"].split() == [str(uid)] * 4
        assert qemu["Groups"] == ""
        assert {name: int(qemu[name], 16) for name in CAPABILITY_SETS} == dict.fromkeys(CAPABILITY_SETS, 0)
        assert qemu["NoNewPrivs"] == "1" and qemu["Seccomp"] == "2"
        # swtpm: the same identity, no capabilities either.
        assert swtpm["Uid"].split() == [str(uid)] * 4 and swtpm["Gid"].split() == [str(uid)] * 4
        assert int(swtpm["CapEff"], 16) == 0 and int(swtpm["CapBnd"], 16) == 0
        assert swtpm["NoNewPrivs"] == "1" and swtpm["Seccomp"] == "2"  # swtpm's own filter, on top
        # The VM's directory is the VM's, private.
        directory = os.stat(machine["runtimeDirectory"])
        assert (directory.st_uid, directory.st_gid, stat.S_IMODE(directory.st_mode)) == (uid, uid, 0o700)
        assert stat.S_IMODE(os.stat(Path(machine["runtimeDirectory"]).parent).st_mode) == 0o700  # machines/: root's alone

        # Everything guest-facing works: the disks the daemon opened, the TPM, the shares.
        with Console(machine) as console:
            console.wait_for(r"VMSPAWND-TEST: facts-done")
            # each fact once (history and the live stream may both hold a line)
            facts = {key: list(dict.fromkeys(lines)) for key, lines in console.facts().items()}
        serials = {dict(kv.split("=", 1) for kv in line.split()[1:]).get("serial") for line in facts["block"]}
        assert {image.name, drive.name} <= serials, facts["block"]
        assert facts["tpm"] == ["/dev/tpm0 /dev/tpmrm0"]
        assert facts["root-marker"] == ["root-share-marker"]
        assert "/mnt/bind" in {line.split()[1] for line in facts["mount"]}

        qmp = Qmp(qmp_path)
        try:
            # QEMU holds every file it has (firmware, the spec's disks) as an fd the daemon
            # opened: its own view says so.
            nodes = qmp.execute("query-named-block-nodes")["return"]
            assert isinstance(nodes, list)
            files = [node["file"] for node in nodes if node["drv"] == "file"]
            assert len(files) >= 3 and all(f.startswith("/dev/fdset/") for f in files), files
            # A root-only host file cannot be opened: neither a new one, nor the spec's own
            # image by its path (QEMU reached it only through the fd).
            for path, node in ((secret, "stolen"), (image, "again")):
                reply = qmp.execute("blockdev-add", {"driver": "file", "filename": str(path), "node-name": node})
                assert "Permission denied" in reply["error"]["desc"], reply  # type: ignore[index]
        finally:
            qmp.close()
        daemon.call("Terminate", {"name": "confined"})
        daemon.call("Remove", {"name": "confined"})
        assert os.stat(tmp_path / "rootdir.tpmstate").st_uid == 0  # the persistent TPM state, given back


def test_a_qemu_its_sandbox_kills_is_reported_as_such(daemon: Daemon, guest: Guest, qmp_dir: Path) -> None:
    """migrate to `exec:` makes QEMU fork and exec a helper: spawn=deny kills it (SIGSYS).
    (A VM with virtiofs or a TPM refuses migration before that, hence a plain VM here.)"""
    if os.geteuid() != 0:
        pytest.skip("only the system instance (root) confines its VMs")
    qmp_path = qmp_dir / "kill.qmp"
    spec = waiting_spec(guest, "sandboxed", qemuExtra=["-qmp", f"unix:{qmp_path},server=on,wait=off"])
    with no_leaks(daemon), EventStream(daemon) as events:
        daemon.call("Spawn", {"spec": spec})
        qmp = Qmp(qmp_path)
        try:
            with pytest.raises(ConnectionError):
                qmp.execute("migrate", {"uri": "exec:true"})
        finally:
            qmp.close()
        events.wait_state("sandboxed", "failed")
        machine = daemon.call("Describe", {"name": "sandboxed"})["machine"]
        assert machine["reason"] == "QEMU was killed by SIGSYS: QEMU's seccomp sandbox (-sandbox) refused a system call"
        daemon.call("Remove", {"name": "sandboxed"})


def test_a_forged_state_of_a_confined_vm_is_not_adopted_and_names_nothing_to_stop(guest: Guest) -> None:
    """An escaped QEMU owns its VM's directory: it can rename a file whose bytes it chose
    (its log, its console history) over state.json, naming a host process. A restarted daemon
    must neither adopt that record nor stop what it names (vmspawnd/state_seal.py)."""
    if os.geteuid() != 0:
        pytest.skip("only the system instance (root) confines its VMs")
    runtime = make_runtime_dir()
    victim = subprocess.Popen(["sleep", "600"])
    try:
        with orphans_reaped():
            first = start_daemon(runtime)
            try:
                machine = first.call("Spawn", {"spec": waiting_spec(guest, "forged")})["machine"]
            finally:
                first.process.send_signal(signal.SIGKILL)
                first.process.wait()
                first.notify.close()
            directory = Path(str(machine["runtimeDirectory"]))
            data = json.loads((directory / "state.json").read_text())
            data["machine"]["helpers"] = {"swtpm": describe_process(victim.pid).to_json()}
            filled = directory / "qemu.log"  # root's file, with bytes QEMU wrote
            filled.write_text(json.dumps(data))
            os.replace(filled, directory / "state.json")

            second = start_daemon(runtime)
            try:
                assert second.call("List")["machines"] == []
                assert "state.json is not the one this daemon wrote" in second.log()
                assert victim.poll() is None  # what the forged record named was left alone
                assert machine["qemu"]["pid"] not in qemu_processes()  # the VM itself was stopped
                assert not directory.exists() and not (runtime / "seals" / directory.name).exists()
            finally:
                stop_daemon(second)
    finally:
        victim.kill()
        victim.wait()
        kill_leftovers(runtime)
        shutil.rmtree(runtime.parent, ignore_errors=True)


def test_qemu_user_root_runs_qemu_as_systemd_vmspawn_does(guest: Guest) -> None:
    """The opt-out: `vmspawnd --qemu-user=root` starts QEMU as root, unsandboxed, with the
    paths of the spec on its command line (vmspawn's own argv)."""
    if os.geteuid() != 0:
        pytest.skip("only the system instance (root) confines its VMs")
    runtime = make_runtime_dir()
    try:
        daemon = start_daemon(runtime, "--qemu-user=root")
        try:
            machine = daemon.call("Spawn", {"spec": waiting_spec(guest, "asroot")})["machine"]
            pid = int(machine["qemu"]["pid"])
            status = proc_status(pid)
            assert status["Uid"].split() == ["0"] * 4 and status["Seccomp"] == "0"
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert str(guest.kernel).encode() in argv and b"-sandbox" not in argv
            assert os.stat(machine["runtimeDirectory"]).st_uid == 0
        finally:
            stop_daemon(daemon)
    finally:
        shutil.rmtree(runtime.parent, ignore_errors=True)
