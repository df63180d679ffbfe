# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pure part of snapshots: what a clone must share with its bundle, its spec, its argv.

The argvs are the real builder's (vmspawnd.qemu.command) for two VMs of one spec that
differ only in what differs per VM (runtime directory, fds, vmgenid, CID, name); the
bundle store runs on a real temporary directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.golden.scenarios import BASE, IMG
from vmspawnd.errors import InvalidSpec, NoSuchSnapshot
from vmspawnd.model import SnapshotRecord
from vmspawnd.qemu import nic
from vmspawnd.qemu.command import build_qemu_command
from vmspawnd.qemu.resources import Resources
from vmspawnd.snapshot_bundle import BundleStore, write_metadata
from vmspawnd.snapshot_config import (
    clone_argv,
    clone_spec_json,
    differing_options,
    disk_device,
    disk_file,
    next_fdset,
    nic_device,
    normalize_argv,
    refused_clone_fields,
    virtiofs_fields,
)
from vmspawnd.spec import VmSpec

SOURCE_DIR = "/run/vmspawnd/machines/aaaa"
CLONE_DIR = "/run/vmspawnd/machines/bbbb"


def resources_in(directory: str, **changes: object) -> Resources:
    """BASE, with every per-VM value of a VM living in `directory`."""
    return dataclasses.replace(
        BASE,
        console_log=f"{directory}/console.log",
        payload_dir=f"{directory}/payload",
        **changes,  # type: ignore[arg-type]
    )


def argv_of(spec: VmSpec, directory: str, **changes: object) -> list[str]:
    return build_qemu_command(spec, resources_in(directory, **changes)).argv


SOURCE_SPEC = VmSpec(name="src", image=IMG, ram=256 * 1024 * 1024)


def test_two_vms_of_one_spec_have_the_same_normalized_configuration() -> None:
    source = argv_of(SOURCE_SPEC, SOURCE_DIR)
    clone = argv_of(
        dataclasses.replace(SOURCE_SPEC, name="clone", image="/var/lib/vmspawnd/snapshots/b/disk.raw"),
        CLONE_DIR,
        qmp_fd=7,
        console_fd=9,
        vmgenid="ffffffff-0000-4000-8000-000000000002",
        vsock_cid=1234,
    )
    assert source != clone
    assert differing_options(normalize_argv(source, SOURCE_DIR), normalize_argv(clone, CLONE_DIR)) == []


def test_other_memory_or_an_extra_device_is_named() -> None:
    saved = normalize_argv(argv_of(SOURCE_SPEC, SOURCE_DIR), SOURCE_DIR)
    bigger = normalize_argv(argv_of(dataclasses.replace(SOURCE_SPEC, ram=512 * 1024 * 1024), CLONE_DIR), CLONE_DIR)
    assert differing_options(saved, bigger) == ["-m 256M", "-m 512M"]
    extra = normalize_argv(argv_of(dataclasses.replace(SOURCE_SPEC, qemu_extra=["-device", "e1000"]), CLONE_DIR), CLONE_DIR)
    assert differing_options(saved, extra) == ["-device e1000"]


def test_clone_argv_puts_the_disk_on_an_overlay_behind_the_source_device() -> None:
    source = argv_of(SOURCE_SPEC, SOURCE_DIR)
    device = disk_device(source)
    assert device is not None and "serial=fedora.raw" in device
    clone_spec = dataclasses.replace(SOURCE_SPEC, image="/b/disk.raw")
    argv = clone_argv(
        argv_of(clone_spec, CLONE_DIR), base="/b/disk.raw", overlay=f"{CLONE_DIR}/disk.qcow2", device=device, discard=True
    )
    assert argv[-2:] == ["-incoming", "defer"]
    assert not any(a.startswith("if=none,id=vmspawn,") for a in argv)  # the source's -drive is gone
    blockdevs = [b for a, b in zip(argv, argv[1:], strict=False) if a == "-blockdev"]
    assert blockdevs == [
        "driver=file,filename=/b/disk.raw,read-only=on,node-name=vmspawn-base-file",
        "driver=raw,file=vmspawn-base-file,read-only=on,node-name=vmspawn-base",
        f"driver=qcow2,file.driver=file,file.filename={CLONE_DIR}/disk.qcow2,backing=vmspawn-base,discard=unmap,node-name=vmspawn",
    ]
    assert disk_device(argv) == device  # the guest sees the source's disk, serial and all


def test_confined_clones_compare_without_fd_plumbing_and_put_both_disk_nodes_on_fdsets() -> None:
    """A confined source passes its image read-write (two fds), a clone its frozen base
    read-only (one): `-add-fd` is plumbing, not configuration. The clone's base stays on
    the set the daemon passed, its overlay gets the next one; QEMU locks neither (the
    daemon holds the lock, qemu/handover.py)."""
    source = argv_of(SOURCE_SPEC, SOURCE_DIR, confined=True, file_fds={IMG: (20, 21)})
    frozen = "/b/disk.raw"
    clone = argv_of(dataclasses.replace(SOURCE_SPEC, image=frozen), CLONE_DIR, confined=True, file_fds={frozen: (30,)})
    assert differing_options(normalize_argv(source, SOURCE_DIR), normalize_argv(clone, CLONE_DIR)) == []
    base = disk_file(clone)
    assert base is not None and base.startswith("/dev/fdset/")
    overlay = f"/dev/fdset/{next_fdset(clone)}"
    assert overlay != base
    argv = clone_argv(clone, base=base, overlay=overlay, device=disk_device(source), discard=False)
    blockdevs = [b for a, b in zip(argv, argv[1:], strict=False) if a == "-blockdev"]
    assert blockdevs[0] == f"driver=file,filename={base},locking=off,read-only=on,node-name=vmspawn-base-file"
    assert f"file.filename={overlay},file.locking=off," in blockdevs[2]
    assert disk_file(source) is not None and disk_file(argv) is None  # the -drive went to the graph


NETWORKED = dataclasses.replace(SOURCE_SPEC, network_tap=True)


def test_the_card_is_not_configuration_and_a_clone_plugs_its_own_after_cont() -> None:
    """A snapshot unplugs the source's card: neither its recorded argv nor a clone's carry
    one (an extra device would sit in the restored guest unannounced); the clone's card,
    with the MAC a VM of its name gets, is what Machine.start plugs after `cont`."""
    source = argv_of(NETWORKED, SOURCE_DIR)
    clone_spec = dataclasses.replace(NETWORKED, name="clone", image="/b/disk.raw")
    clone = argv_of(clone_spec, CLONE_DIR)
    card, clone_card = nic_device(source), nic_device(clone)
    assert card is not None and clone_card is not None
    assert nic.mac_of(card) != nic.mac_of(clone_card)  # derived from each VM's name
    saved = normalize_argv(source, SOURCE_DIR)
    assert nic_device(saved) is None and "-netdev" in saved  # the backend and its port stay
    assert differing_options(saved, normalize_argv(clone, CLONE_DIR)) == []
    argv = clone_argv(clone, base="/b/disk.raw", overlay=f"{CLONE_DIR}/disk.qcow2", device=None, discard=True)
    assert nic_device(argv) is None and f"id={nic.PORT_ID}" in ",".join(argv)


def test_a_source_without_network_and_a_networked_clone_differ() -> None:
    saved = normalize_argv(argv_of(SOURCE_SPEC, SOURCE_DIR), SOURCE_DIR)
    networked = normalize_argv(argv_of(NETWORKED, CLONE_DIR), CLONE_DIR)
    assert "-nic none" in differing_options(saved, networked)


def test_clone_spec_is_the_bundle_spec_with_the_clone_own_fields() -> None:
    bundle = {"name": "src", "image": "/img/src.raw", "ram": 268435456, "growImage": 1 << 30, "uuid": "u", "tpm": True}
    spec = clone_spec_json(bundle, {"name": "c1", "register": False}, disk="/b/disk.raw")
    assert spec == {
        "name": "c1",
        "image": "/b/disk.raw",
        "ram": 268435456,
        "tpm": True,
        "register": False,
        "tpmState": "off",
        "notifyReady": False,
    }
    VmSpec.from_json(spec)  # a valid spec


def test_refused_fields_are_those_that_shape_the_hardware() -> None:
    bundle = {"name": "src", "image": "/img/src.raw", "ram": 268435456, "cpus": "2"}
    request = {"name": "c", "ram": 536870912, "cpus": "2", "register": False, "binds": [{"source": "/a", "target": "/b"}]}
    assert refused_clone_fields(bundle, request) == ["ram", "binds"]
    # The MAC is the clone's own (its card is plugged after the restore), the TAP mode is not.
    assert (
        refused_clone_fields({"networkTap": True, "networkMac": "02:00:00:00:00:01"}, {"networkMac": "02:00:00:00:00:02"}) == []
    )
    assert refused_clone_fields({"networkTap": True}, {"networkTap": False}) == ["networkTap"]
    assert "networkMac" not in clone_spec_json({"networkTap": True, "networkMac": "02:00:00:00:00:01"}, {"name": "c"}, None)
    assert virtiofs_fields({"directory": "/srv/root", "binds": []}) == ["directory"]


def record(name: str, path: Path) -> SnapshotRecord:
    return SnapshotRecord(
        name=name,
        path=str(path),
        machine="src",
        created=1,
        qemu_version="7.2.22",
        ram=1,
        state_size=1,
        disk_size=0,
        spec={"name": "src"},
        argv=[],
        disk_device="",
        save_seconds=0.1,
    )


def test_store_lists_finished_bundles_and_removes_them(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "snapshots")
    assert store.list() == []
    done = store.new_bundle("done", None)
    write_metadata(done, record("done", done))
    store.new_bundle("unfinished", None)  # a save in progress, or cut short
    assert (done.stat().st_mode & 0o777, (done / "bundle.json").stat().st_mode & 0o777) == (0o700, 0o600)
    assert [r.name for r in store.list()] == ["done"]
    assert store.load("done").qemu_version == "7.2.22"
    with pytest.raises(InvalidSpec):
        store.new_bundle("done", None)
    with pytest.raises(NoSuchSnapshot):
        store.load("unfinished")
    store.remove("unfinished")
    store.remove("done")
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == []
    with pytest.raises(NoSuchSnapshot):
        store.remove("done")


def test_store_refuses_names_that_are_paths_and_output_that_is_not_empty(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "snapshots")
    with pytest.raises(InvalidSpec):
        store.new_bundle("../escape", None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(InvalidSpec):
        store.new_bundle(None, str(tmp_path / "full"))
    # A directory given by path that is no bundle is never deleted.
    with pytest.raises(NoSuchSnapshot):
        store.remove(str(tmp_path / "full"))
    assert (tmp_path / "full" / "file").exists()
