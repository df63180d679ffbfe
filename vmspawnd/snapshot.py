# SPDX-License-Identifier: LGPL-2.1-or-later
"""Snapshots of a running VM, and clones started from them.

`take_snapshot` unplugs the VM's network card (qemu/nic.py: the bundle holds none, so each
clone can plug one with its own MAC), pauses the VM, has QEMU write its state into a
bundle (qemu/migration.py), freezes the disk and NVRAM next to it while the guest cannot
write, records the exact QEMU configuration and version, then plugs the card back and
resumes or stops the VM. `CloneSource` is what a clone's `Machine.start` does
differently: a qcow2 overlay on the frozen disk, the bundle's NVRAM, the argv checked
against the bundle and rewritten to read the state, the state loaded before `cont`, and
the clone's own card plugged after it. Everything else (a new vmgenid guid, runtime
directory, console, control socket, vsock CID, swtpm) a clone gets as any VM does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmspawnd.control import SubscribeQmp
from vmspawnd.errors import InvalidState, SnapshotIncompatible
from vmspawnd.model import MachineState, SnapshotRecord
from vmspawnd.qemu import handover, migration, nic
from vmspawnd.qemu.command import QemuCommand
from vmspawnd.qemu.monitor import QemuMonitor
from vmspawnd.qemu.qmp import QmpError
from vmspawnd.runtime_dir import VmPaths
from vmspawnd.snapshot_bundle import DISK, NVRAM, STATE, write_metadata
from vmspawnd.snapshot_config import (
    clone_argv,
    differing_options,
    disk_device,
    disk_file,
    next_fdset,
    nic_device,
    normalize_argv,
    virtiofs_fields,
)

if TYPE_CHECKING:
    from vmspawnd.machine import Machine

_log = logging.getLogger(__name__)

OVERLAY = "disk.qcow2"


async def _run(*argv: str) -> None:
    """A short tool run (cp, qemu-img): its stderr becomes the error."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace').strip()}")


async def freeze_disk(image: str, target: Path) -> None:
    """A copy of the raw image as it is now. `cp --reflink=auto --sparse=always`: on btrfs
    or XFS a reflink costs nothing however large the image; elsewhere the copy keeps the
    holes (qemu-img convert would too, but reads every byte through QEMU's block layer)."""
    await _run("cp", "--reflink=auto", "--sparse=always", "--", image, str(target))
    os.chmod(target, 0o600)


def _qemu_argv(machine: Machine) -> list[str]:
    """The source's argv as the kernel has it: true for adopted VMs too."""
    assert machine.record.qemu is not None
    raw = Path(f"/proc/{machine.record.qemu.pid}/cmdline").read_bytes()
    return [word.decode() for word in raw.split(b"\0")[:-1]]


def _has_card(machine: Machine) -> bool:
    return machine.spec.network_tap or machine.spec.network_user_mode


def refuse_unless_snapshottable(machine: Machine, reference: str) -> None:
    """Raise what keeps `machine` from being saved, before anything is touched: virtiofs
    shares (SnapshotIncompatible naming them), a VM that does not run, a paused one with a
    network card (its guest must eject the card first: InvalidState)."""
    shares = virtiofs_fields(machine.record.spec)
    if shares:
        raise SnapshotIncompatible(reference, shares, "virtiofs shares (vhost-user-fs) cannot be migrated")
    state = machine.record.state
    if state not in (MachineState.RUNNING, MachineState.READY):
        raise InvalidState(machine.name, state.value, "snapshot")
    if _has_card(machine) and machine.record.paused:
        reason = "snapshot (it is paused, and a paused guest cannot release its network card; resume it first)"
        raise InvalidState(machine.name, state.value, reason)


async def take_snapshot(machine: Machine, bundle: Path, name: str, stop: bool) -> SnapshotRecord:
    """Save `machine` into the empty directory `bundle`; resume it (or stop it, `stop`).

    The caller has checked `refuse_unless_snapshottable` first. On failure the bundle is
    deleted and a VM that was running runs again, with its network card.
    """
    spec = machine.spec
    was_paused = machine.record.paused
    has_card = _has_card(machine)
    card_mac: str | None = None  # set while the source's card is unplugged
    paused_here = False
    try:
        if has_card:
            try:
                card_mac = await nic.unplug(machine.monitor, machine.subscribe_qmp)
            except nic.UnplugRefused as exc:
                raise InvalidState(machine.name, machine.record.state.value, f"snapshot ({exc})") from exc
        if not was_paused:
            await machine.pause()
            paused_here = True
        try:
            save_seconds = await migration.save_state(machine.monitor, machine.subscribe_qmp, bundle / STATE)
        except (migration.MigrationFailed, QmpError) as exc:
            raise InvalidState(machine.name, machine.record.state.value, f"snapshot (QEMU: {exc})") from exc
        version = await migration.qemu_version(machine.monitor)
        argv = _qemu_argv(machine)
        disk_size = 0
        if spec.image:
            await freeze_disk(spec.image, bundle / DISK)
            disk_size = os.stat(bundle / DISK).st_blocks * 512
        if machine.paths.efi_vars.exists():
            shutil.copyfile(machine.paths.efi_vars, bundle / NVRAM)
            os.chmod(bundle / NVRAM, 0o600)
        record = SnapshotRecord(
            name=name,
            path=str(bundle),
            machine=machine.name,
            created=time.time_ns() // 1000,
            qemu_version=version,
            ram=spec.ram,
            state_size=os.stat(bundle / STATE).st_size,
            disk_size=disk_size,
            spec=dict(machine.record.spec),
            argv=normalize_argv(argv, str(machine.directory)),
            disk_device=disk_device(argv) or "",
            save_seconds=round(save_seconds, 3),
        )
        write_metadata(bundle, record)
    except BaseException:
        shutil.rmtree(bundle, ignore_errors=True)
        if machine.record.state.is_active:
            if card_mac is not None:
                await nic.plug(machine.monitor, card_mac)
            if paused_here:
                await machine.resume()
        raise
    _log.info("%s: snapshot %s written in %.2fs (%d bytes of state)", machine.name, bundle, save_seconds, record.state_size)
    if stop:
        await machine.terminate()
        return record
    if card_mac is not None:
        await nic.plug(machine.monitor, card_mac)  # the source's own card, its MAC unchanged
    if paused_here:
        await machine.resume()
    return record


@dataclasses.dataclass(frozen=True)
class CloneSource:
    """The bundle a clone starts from, and the steps of Machine.start it changes."""

    bundle: SnapshotRecord
    reference: str  # how the client named the bundle, for errors

    @property
    def path(self) -> Path:
        return Path(self.bundle.path)

    @property
    def has_disk(self) -> bool:
        """Whether the source had a disk image (a `--linux` VM may have none)."""
        return (self.path / DISK).exists()

    async def prepare(self, paths: VmPaths) -> None:
        """The clone's own files: a qcow2 overlay on the frozen disk, a copy of the NVRAM
        (over the template copy resolve_host made: the guest's variables travel in the
        state, but the firmware also reads and writes the file)."""
        if self.has_disk:
            await _run(
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(self.path / DISK),
                str(paths.directory / OVERLAY),
            )
        if (self.path / NVRAM).exists():
            shutil.copyfile(self.path / NVRAM, paths.efi_vars)
            os.chmod(paths.efi_vars, 0o600)

    def open_overlay(self, paths: VmPaths) -> tuple[int, ...]:
        """For a confined QEMU: the overlay prepare() made, opened (and write-locked) by the
        daemon as any disk is (qemu/handover.py); none for a source without a disk."""
        if not self.has_disk:
            return ()
        return handover.open_for_qemu(str(paths.directory / OVERLAY), True)

    def adapt(self, command: QemuCommand, paths: VmPaths, discard: bool, overlay_fds: tuple[int, ...] = ()) -> QemuCommand:
        """The clone's command: refused unless it is the source's configuration, then the
        disk on the overlay (passed as `overlay_fds` to a confined QEMU), `-incoming defer`,
        and the network card (with the clone's own MAC) plugged after `cont`."""
        differing = differing_options(self.bundle.argv, normalize_argv(command.argv, str(paths.directory)))
        if differing:
            raise SnapshotIncompatible(
                self.reference, differing, "the clone's QEMU configuration differs from the one the state was saved with"
            )
        argv, fds = list(command.argv), list(command.pass_fds)
        card = nic_device(argv)  # what a VM of the clone's name gets, plugged after `cont`
        hotplug = [nic.device_properties(nic.mac_of(card))] if card is not None else []
        overlay = str(paths.directory / OVERLAY)
        if overlay_fds:
            fdset = next_fdset(argv)
            for fd in overlay_fds:
                argv[1:1] = ["-add-fd", f"fd={fd},set={fdset},opaque={overlay.replace(',', ',,')}"]
            overlay = f"/dev/fdset/{fdset}"
            fds += overlay_fds
        argv = clone_argv(
            argv,
            base=disk_file(argv) or str(self.path / DISK),  # the frozen base, by path or by fd
            overlay=overlay,
            device=self.bundle.disk_device or None,
            discard=discard,
        )
        return dataclasses.replace(command, argv=argv, pass_fds=fds, hotplug=command.hotplug + hotplug)

    async def load(self, monitor: QemuMonitor, subscribe: SubscribeQmp) -> None:
        """Check QEMU's version against the bundle's, then load the state (the VM stays
        paused for Machine.start's `cont`)."""
        version = await migration.qemu_version(monitor)
        if version != self.bundle.qemu_version:
            raise SnapshotIncompatible(
                self.reference,
                ["qemu"],
                f"the bundle was made by QEMU {self.bundle.qemu_version}, this QEMU is {version}; "
                "migration streams are only loaded by the QEMU that wrote them",
            )
        try:
            await migration.load_state(monitor, subscribe, self.path / STATE)
        except migration.MigrationFailed as exc:
            raise SnapshotIncompatible(self.reference, [], f"QEMU could not load the saved state: {exc}") from exc
