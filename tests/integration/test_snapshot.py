# SPDX-License-Identifier: LGPL-2.1-or-later
"""Snapshots and clones of a real guest (issue #17): the busybox test guest with a raw
disk, saved once, restored into clones that each answer on their console, see the
vmgenid change (the guest kernel logs the "virtual machine fork"), write to their own
disk only, have a network card with a MAC of their own (the source's card is unplugged
for the snapshot and plugged back), and stop and go cleanly. Refusals are typed and name
what is in the way.

At most two VMs at once (the machine's limit), except the "at once" test, which stops the
source first and runs three clones together.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import JsonObject, VarlinkError

from tests.guest.build import Guest
from tests.support import Console, Daemon, make_runtime_dir, orphans_reaped, start_daemon, stop_daemon, waiting_spec
from vmspawnd.qemu.resolve import host_machine_id
from vmspawnd.qemu.siphash import derive_mac

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
SOURCE = "snapsrc"
BUNDLE = "snapsrc-bundle"


@pytest.fixture(scope="module")
def runtime() -> Iterator[Path]:
    path = make_runtime_dir("vmspawnd-snapshot-")
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def sdaemon(runtime: Path) -> Iterator[Daemon]:
    daemon = start_daemon(runtime)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


@pytest.fixture(scope="module")
def disk(runtime: Path) -> Path:
    """A zeroed raw disk: each VM writes a marker at its start and reads it back."""
    path = runtime.parent / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    return path


# As root the daemon creates each VM's TAP device (vt-NAME) and derives its MAC from the
# host's machine-id and the VM's name; a user instance has user-mode networking, where every
# VM has QEMU's default MAC (as with systemd-vmspawn), so only root checks MACs.
AS_ROOT = os.geteuid() == 0
NETWORK = {"networkTap": True} if AS_ROOT else {"networkUserMode": True}
# What the source's guest reported around its snapshot (the bundle fixture fills it).
SOURCE_FACTS: dict[str, str] = {}


def spec(name: str, guest: Guest, disk: Path) -> dict[str, object]:
    return waiting_spec(guest, name, image=str(disk), **NETWORK)


def guest_mac(console: Console) -> str:
    """The MAC of the guest's eth0, once the (hot-plugged) card has appeared."""
    return run(
        console,
        "for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done;"
        " echo mac$((1+0))-[$(cat /sys/class/net/eth0/address)]",
        "mac1",
    )


@pytest.fixture(scope="module")
def bundle(sdaemon: Daemon, guest: Guest, disk: Path) -> JsonObject:
    """The source, booted to its shell, snapshotted once, then stopped (its bundle stays)."""
    sdaemon.call("Spawn", {"spec": spec(SOURCE, guest, disk)})
    machine = sdaemon.call("Describe", {"name": SOURCE})["machine"]
    confined_as_root(machine)
    with Console(machine) as console:
        console.wait_for(r"guest# ")
        SOURCE_FACTS["mac before"] = guest_mac(console)
        sdaemon.call("Pause", {"name": SOURCE})
        with pytest.raises(VarlinkError) as paused:
            sdaemon.call("Snapshot", {"name": SOURCE, "bundle": BUNDLE})
        SOURCE_FACTS["paused refusal"] = f"{paused.value.short_name}: {paused.value.parameters}"
        sdaemon.call("Resume", {"name": SOURCE})
        snapshot = sdaemon.call("Snapshot", {"name": SOURCE, "bundle": BUNDLE})["snapshot"]
        # The source runs on after the snapshot: its console answers, and its disk is its own.
        console.send("printf SOURCE > /dev/vda && sync && echo source-$((6*7))\r")
        console.wait_for(r"source-42")
        SOURCE_FACTS["mac after"] = guest_mac(console)
        SOURCE_FACTS["cards"] = run(console, "echo cards$((1+0))-[$(ls /sys/class/net | tr '\\n' ' ')]", "cards1")
    sdaemon.call("Terminate", {"name": SOURCE})
    sdaemon.call("Remove", {"name": SOURCE})
    assert isinstance(snapshot, dict)
    return snapshot


def run(console: Console, command: str, marker: str) -> str:
    """Type `command`, which prints `marker`-[VALUE]; VALUE."""
    console.send(command + "\r")
    return console.wait_for(marker + r"-\[([^\]\r\n]*)\]", timeout=60).group(1)


def check_clone(console: Console, index: int, name: str) -> str:
    """Answers, saw the vmgenid change, and finds the disk as the snapshot left it (none
    of the source's or other clones' later writes), then writes its own marker; has a
    network card with the MAC a VM of its name gets; that MAC."""
    mac = guest_mac(console)
    if AS_ROOT:
        machine_id = host_machine_id()
        assert machine_id is not None and mac == derive_mac(machine_id, name)
        assert mac != SOURCE_FACTS["mac before"]
    forks = run(console, "echo fork-[$(dmesg | grep -c 'crng reseeded due to virtual machine fork')]", "fork")
    assert int(forks) >= 1
    before = run(
        console, "echo 3 > /proc/sys/vm/drop_caches; echo disk$((1+0))-[$(head -c 16 /dev/vda | tr -dc A-Z0-9-)]", "disk1"
    )
    assert before == ""
    run(console, f"printf CLONE-{index} > /dev/vda && sync; echo wrote-[$((40+{index}))]", "wrote")
    after = run(
        console, "echo 3 > /proc/sys/vm/drop_caches; echo disk$((2+0))-[$(head -c 16 /dev/vda | tr -dc A-Z0-9-)]", "disk2"
    )
    assert after == f"CLONE-{index}"
    return mac


def qemu_vmgenid(machine: JsonObject) -> str:
    pid = machine["qemu"]["pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    (device,) = (a.decode() for a in argv if a.startswith(b"vmgenid,"))
    return device.split("guid=", 1)[1]


def confined_as_root(machine: JsonObject) -> None:
    """As root (the system instance), source and clones run confined (docs/security.md):
    QEMU under the VM's own uid, sandboxed, its disk nodes on fds the daemon passed."""
    if os.geteuid() != 0:
        return
    pid = machine["qemu"]["pid"]
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] != "0" and status["Seccomp"].strip() == "2", status
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    disks = [a for a in argv if a.startswith((b"if=none,id=vmspawn,", b"driver=file,", b"driver=qcow2,"))]
    assert disks and all(b"/dev/fdset/" in a and b"locking=off" in a for a in disks), disks


def stop_and_remove(daemon: Daemon, name: str) -> None:
    runtime = Path(str(daemon.call("Describe", {"name": name})["machine"]["runtimeDirectory"]))
    daemon.call("Terminate", {"name": name})
    daemon.call("Remove", {"name": name})
    assert not runtime.exists()


def test_snapshot_bundle_is_private_and_records_the_source(sdaemon: Daemon, bundle: JsonObject, disk: Path) -> None:
    path = Path(str(bundle["path"]))
    assert path.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    # efivars.fd: the NVRAM copy, when the source had firmware with one.
    assert set(modes) - {"efivars.fd"} == {"bundle.json", "state", "disk.raw"}
    assert set(modes.values()) == {0o600}
    assert bundle["machine"] == SOURCE and bundle["ram"] == 256 * MIB
    assert 0 < int(str(bundle["stateSize"])) < 256 * MIB
    # The source's write after the snapshot reached its own image, not the frozen copy.
    assert disk.read_bytes()[:6] == b"SOURCE"
    assert (path / "disk.raw").read_bytes()[:6] == b"\0" * 6
    assert [s["name"] for s in sdaemon.call("ListSnapshots")["snapshots"]] == [BUNDLE]


def test_the_source_keeps_its_card_and_its_mac(bundle: JsonObject) -> None:
    """The snapshot unplugged the source's card (the bundle holds none) and plugged it
    back with its MAC; a paused source was refused first (its guest cannot eject a card)."""
    assert SOURCE_FACTS["mac after"] == SOURCE_FACTS["mac before"] != ""
    assert SOURCE_FACTS["cards"].split() == ["eth0", "lo"]
    assert SOURCE_FACTS["paused refusal"].startswith("InvalidState:")
    assert "network card" in SOURCE_FACTS["paused refusal"]


def test_three_clones_in_a_row(sdaemon: Daemon, bundle: JsonObject) -> None:
    guids, macs = set(), set()
    for index in range(3):
        name = f"clone{index}"
        started = time.monotonic()
        machine = sdaemon.call("Spawn", {"spec": {"name": name}, "fromSnapshot": BUNDLE})["machine"]
        confined_as_root(machine)
        with Console(machine) as console:
            assert run(console, "echo answer-[$((6*7))]", "answer") == "42"
            print(f"{name}: console answered {time.monotonic() - started:.2f}s after Spawn")
            macs.add(check_clone(console, index, name))
        guids.add(qemu_vmgenid(machine))
        stop_and_remove(sdaemon, name)
    assert len(guids) == 3
    assert len(macs) == (3 if AS_ROOT else 1)


def test_three_clones_at_once(sdaemon: Daemon, bundle: JsonObject) -> None:
    names = [f"many{index}" for index in range(3)]
    macs = set()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        machines = list(
            pool.map(lambda n: sdaemon.call("Spawn", {"spec": {"name": n}, "fromSnapshot": BUNDLE})["machine"], names)
        )
    try:
        for index, machine in enumerate(machines):
            with Console(machine) as console:
                macs.add(check_clone(console, index, names[index]))
        assert len({qemu_vmgenid(m) for m in machines}) == 3
        assert len(macs) == (3 if AS_ROOT else 1)
    finally:
        for name in names:
            stop_and_remove(sdaemon, name)


def refusal(daemon: Daemon, params: dict[str, object]) -> VarlinkError:
    with pytest.raises(VarlinkError) as refused:
        daemon.call("Spawn", params)
    return refused.value


def test_clone_with_other_memory_or_a_share_is_refused(sdaemon: Daemon, bundle: JsonObject, tmp_path: Path) -> None:
    err = refusal(sdaemon, {"spec": {"name": "bigger", "ram": 512 * MIB}, "fromSnapshot": BUNDLE})
    assert err.short_name == "SnapshotIncompatible" and err.parameters["options"] == ["ram"]
    share = {"source": str(tmp_path), "target": "/mnt/share", "readOnly": False}
    err = refusal(sdaemon, {"spec": {"name": "shared", "binds": [share]}, "fromSnapshot": BUNDLE})
    assert err.short_name == "SnapshotIncompatible" and err.parameters["options"] == ["binds"]
    err = refusal(sdaemon, {"spec": {"name": "nobundle"}, "fromSnapshot": "no-such-bundle"})
    assert err.short_name == "NoSuchSnapshot"
    assert [m["name"] for m in sdaemon.call("List")["machines"]] == []


def test_bundle_of_another_qemu_version_is_refused(sdaemon: Daemon, bundle: JsonObject) -> None:
    """The bundle's recorded version is rewritten (we have one QEMU): the clone's QEMU
    reports its own, and the start fails naming both, leaving nothing behind."""
    copy = Path(str(bundle["path"])).parent / "other-qemu"
    shutil.copytree(str(bundle["path"]), copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["snapshot"]["qemuVersion"] = "6.2.0 (Debian 1:6.2+dfsg-2)"
    (copy / "bundle.json").write_text(json.dumps(meta))
    try:
        err = refusal(sdaemon, {"spec": {"name": "oldqemu"}, "fromSnapshot": "other-qemu"})
        assert err.short_name == "SnapshotIncompatible" and err.parameters["options"] == ["qemu"]
        assert "6.2.0" in str(err.parameters["reason"])
        assert [m["name"] for m in sdaemon.call("List")["machines"]] == []
    finally:
        sdaemon.call("RemoveSnapshot", {"bundle": "other-qemu"})
    assert not copy.exists()


def test_tpm_clones_through_the_cli_read_the_saved_tpm(sdaemon: Daemon, guest: Guest, runtime: Path) -> None:
    """`vmspawnctl snapshot --stop` and `start --from-snapshot`: with --tpm=yes each clone
    reads the TPM, and its PCR 0 is the source's (the firmware's measurements, which a
    fresh TPM would not have): the TPM state travelled in the bundle to each clone's swtpm."""
    disk = runtime.parent / "tpm-disk.raw"
    with open(disk, "wb") as f:
        f.truncate(16 * MIB)
    sdaemon.call("Spawn", {"spec": dict(spec("tpmsrc", guest, disk), tpm=True)})
    machine = sdaemon.call("Describe", {"name": "tpmsrc"})["machine"]
    read_pcr = "echo pcr-[$(cat /sys/class/tpm/tpm0/pcr-sha256/0)]"
    with Console(machine) as console:
        console.wait_for(r"guest# ")
        source_pcr = run(console, read_pcr, "pcr")
    assert len(source_pcr) == 64 and source_pcr != "0" * 64
    out = sdaemon.ctl("snapshot", "tpmsrc", "--name=tpm-bundle", "--stop", check=True)
    assert "tpmsrc: saved to" in out.stdout
    assert sdaemon.call("Describe", {"name": "tpmsrc"})["machine"]["state"] == "stopped"
    sdaemon.call("Remove", {"name": "tpmsrc"})
    listed = sdaemon.ctl("snapshot", "list", check=True).stdout
    assert "tpm-bundle\ttpmsrc\t256M RAM" in listed
    try:
        for index in range(2):
            name = f"tpmclone{index}"
            sdaemon.ctl("start", "--from-snapshot=tpm-bundle", "-M", name, check=True)
            clone = sdaemon.call("Describe", {"name": name})["machine"]
            assert "swtpm" in clone["helpers"]
            with Console(clone) as console:
                assert run(console, read_pcr, "pcr") == source_pcr
            stop_and_remove(sdaemon, name)
        refused = sdaemon.ctl("start", "--from-snapshot=tpm-bundle", "-M", "tpmbig", "--ram=1G")
        assert refused.returncode == 1
        assert refused.stderr.startswith("vmspawnctl: snapshot 'tpm-bundle': ") and refused.stderr.rstrip().endswith("(ram)")
    finally:
        sdaemon.ctl("snapshot", "remove", "tpm-bundle", check=True)
    assert "tpm-bundle" not in sdaemon.ctl("snapshot", "list", check=True).stdout


def test_bundles_survive_a_daemon_restart_and_are_removed(  # last: it stops the module's daemon
    runtime: Path, sdaemon: Daemon, bundle: JsonObject
) -> None:
    """A clone running across the restart is adopted like any VM, and the store is read again."""
    with orphans_reaped():  # the survivor's reaper outlives its daemon: ours to reap, not PID 1's
        restart_with_a_clone(runtime, sdaemon)


def restart_with_a_clone(runtime: Path, sdaemon: Daemon) -> None:
    sdaemon.call("Spawn", {"spec": {"name": "survivor"}, "fromSnapshot": BUNDLE})
    sdaemon.process.send_signal(signal.SIGTERM)  # the daemon goes, its VMs stay
    sdaemon.process.wait(timeout=60)
    restarted = start_daemon(runtime)
    try:
        survivor = restarted.call("Describe", {"name": "survivor"})["machine"]
        assert survivor["state"] in ("running", "ready")
        with Console(survivor) as console:
            assert run(console, "echo adopted-[$((6*7))]", "adopted") == "42"
        stop_and_remove(restarted, "survivor")
        assert [s["name"] for s in restarted.call("ListSnapshots")["snapshots"]] == [BUNDLE]
        restarted.call("RemoveSnapshot", {"bundle": BUNDLE})
        assert restarted.call("ListSnapshots")["snapshots"] == []
        with pytest.raises(VarlinkError) as gone:
            restarted.call("RemoveSnapshot", {"bundle": BUNDLE})
        assert gone.value.short_name == "NoSuchSnapshot"
    finally:
        stop_daemon(restarted)
