# SPDX-License-Identifier: LGPL-2.1-or-later
"""The set of VMs of one daemon: names, ownership, and tasks that outlive a request.

A Spawn runs in a task the manager owns, shielded from the caller: if the client hangs
up mid-call, the start still completes (the VM then runs) or unwinds completely.
A VM that failed to start leaves no record: its error went to the caller, and its name
is free at once. A VM that ran keeps its record (exit status, reason, stderr tail)
until `Remove`, as machinectl/libvirt users expect to be able to ask what happened.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from dbus_fast.errors import InvalidAddressError

from vmspawnd import state_seal
from vmspawnd.errors import (
    DBusCallError,
    InvalidSpec,
    InvalidState,
    MachineExists,
    NoSuchMachine,
    SnapshotIncompatible,
    Timeout,
    VmspawnError,
)
from vmspawnd.fanout import FanOut
from vmspawnd.host.cgroup import own_unit, unit_of_pid
from vmspawnd.host.scope import systemd_is_service_manager, unit_is_delegated
from vmspawnd.leftovers import discard_leftovers
from vmspawnd.machine import Machine
from vmspawnd.model import STATE_FORMAT_VERSION, MachineRecord, MachineState, SnapshotRecord
from vmspawnd.runtime_dir import make_private_dir, new_machine_id, read_json
from vmspawnd.settings import Settings
from vmspawnd.snapshot import CloneSource, refuse_unless_snapshottable, take_snapshot
from vmspawnd.snapshot_bundle import DISK, BundleStore
from vmspawnd.snapshot_config import clone_spec_json, refused_clone_fields, virtiofs_fields
from vmspawnd.spec import VmSpec, wire
from vmspawnd.tasks import TaskOwner

_log = logging.getLogger(__name__)

SUBSCRIBER_QUEUE_SIZE = 1024


async def keep_unit_target(caller_pid: int) -> str | None:
    """The unit a --keep-unit VM joins: its caller's. None where systemd manages nothing
    (there are no units to keep). Refused where the caller is in no unit, in vmspawnd's
    own (the VM would go down with every restart of the daemon, and machinectl terminate
    would stop the daemon instead of the VM), or in a unit PID 1 lets no other process
    join (only units with Delegate=yes take processes they did not fork)."""
    if not systemd_is_service_manager(os.environ):
        return None
    user = os.geteuid() != 0
    unit = unit_of_pid(caller_pid, user)
    if unit is None:
        raise InvalidSpec(
            "keepUnit",
            f"the calling client (pid {caller_pid or 'unknown'}) runs in no systemd unit that vmspawnd can see; "
            "run it in a service or scope with Delegate=yes, or leave out --keep-unit",
        )
    if unit == own_unit(user):
        raise InvalidSpec(
            "keepUnit",
            f"the calling client runs in {unit}, vmspawnd's own unit; a VM there would stop with the daemon",
        )
    try:
        delegated = await unit_is_delegated(unit, not user)
    except (OSError, TimeoutError, DBusCallError, InvalidAddressError) as exc:
        raise InvalidSpec("keepUnit", f"cannot ask the service manager about {unit}: {exc}") from None
    if not delegated:
        raise InvalidSpec(
            "keepUnit",
            f"{unit} is not delegated: systemd moves the VM's processes (vmspawnd starts them, not the client) only "
            "into units with Delegate=yes; set it on the unit that runs the client, or leave out --keep-unit",
        )
    return unit


def _events_lost(_event: wire.EventJson) -> wire.EventJson:
    return {"machine": None, "event": "EventsLost", "data": {}}


class Manager:
    def __init__(self, runtime_dir: Path, settings: Settings) -> None:
        self.settings = settings
        self.runtime_dir = runtime_dir
        self.machines_dir = runtime_dir / "machines"
        make_private_dir(self.machines_dir)
        self._machines: dict[str, Machine] = {}
        self._held = TaskOwner("manager")  # ending VMs whose holding client went away
        self._starts = TaskOwner("manager")  # Machine.start tasks: a client that leaves does not cancel them
        self.events: FanOut[wire.EventJson] = FanOut(SUBSCRIBER_QUEUE_SIZE, overflow=_events_lost)
        self.snapshots = BundleStore(settings.snapshot_dir or runtime_dir / "snapshots")
        self._snapshotting: set[str] = set()  # one snapshot per VM at a time

    # --- lookup ---------------------------------------------------------------------
    def get(self, name: str) -> Machine:
        try:
            return self._machines[name]
        except KeyError:
            raise NoSuchMachine(name) from None

    def list(self) -> list[MachineRecord]:
        return [m.record for m in sorted(self._machines.values(), key=lambda m: m.name)]

    # --- spawn ----------------------------------------------------------------------
    def _new_id(self) -> str:
        taken = {m.record.id for m in self._machines.values()}
        while True:
            candidate = new_machine_id()
            if candidate not in taken and not (self.machines_dir / candidate).exists():
                return candidate

    async def spawn(
        self, spec_json: Mapping[str, object], uid: int, caller_pid: int = 0, from_snapshot: str | None = None
    ) -> MachineRecord:
        """Validate, reserve the name, start; returns once QEMU runs the guest.

        `caller_pid` (SO_PEERCRED) is the client whose unit a --keep-unit VM joins.
        `from_snapshot` (a bundle's name or path) makes the VM a clone: its spec is the
        bundle's with the request's fields on top (clone_spec_json)."""
        clone_of = None
        if from_snapshot is not None:
            clone_of, spec_json = self._clone_request(from_snapshot, spec_json)
        spec = VmSpec.from_json(spec_json)
        name = spec.machine_name()
        if name in self._machines:
            raise MachineExists(name)
        caller_unit = await keep_unit_target(caller_pid) if spec.keep_unit else None
        machine_id = self._new_id()
        record = MachineRecord(name=name, id=machine_id, uid=uid, spec=spec.to_json())
        record.enter(MachineState.STARTING)
        machine = Machine(record, spec, self.machines_dir / machine_id, self._publish, self.settings)
        machine.caller_unit = caller_unit
        machine.clone_of = clone_of
        self._machines[name] = machine
        task = machine.starting = self._starts.spawn(machine.start(), f"start {name}", report=False)
        task.add_done_callback(lambda t: self._after_start(machine, t))
        await asyncio.shield(task)
        return machine.record

    def _clone_request(self, reference: str, request: Mapping[str, object]) -> tuple[CloneSource, dict[str, object]]:
        """The bundle a clone starts from and the clone's spec; SnapshotIncompatible naming
        the request's fields a restore cannot honour (virtiofs shares, other hardware)."""
        bundle = self.snapshots.load(reference)
        refused = refused_clone_fields(bundle.spec, request)
        refused += [name for name in virtiofs_fields(request) if name not in refused]
        if refused:
            raise SnapshotIncompatible(reference, refused, "a clone has the hardware of its snapshot; these options differ")
        disk = str(Path(bundle.path) / DISK) if bundle.disk_size or bundle.spec.get("image") else None
        return CloneSource(bundle, reference), clone_spec_json(bundle.spec, request, disk)

    # --- snapshots ------------------------------------------------------------------------
    async def snapshot(self, name: str, bundle: str | None, output: str | None, stop: bool) -> SnapshotRecord:
        """Save VM `name` into a new bundle (`bundle` in the store, default the VM's name,
        or the directory `output`); the VM then runs on, or stops (`stop`)."""
        machine = self.get(name)
        if name in self._snapshotting:
            raise InvalidState(name, machine.record.state.value, "snapshot (a snapshot of it is being taken)")
        refuse_unless_snapshottable(machine, bundle or output or name)
        self._snapshotting.add(name)
        try:
            path = self.snapshots.new_bundle(bundle or name, output)
            return await take_snapshot(machine, path, path.name, stop)
        finally:
            self._snapshotting.discard(name)

    def list_snapshots(self) -> builtins.list[SnapshotRecord]:
        return self.snapshots.list()

    def remove_snapshot(self, reference: str) -> None:
        """Delete a bundle. Clones running from it keep their open files (the state is
        loaded; the frozen disk stays open until they end)."""
        self.snapshots.remove(reference)

    def _after_start(self, machine: Machine, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            # A failed start leaves nothing: the caller got the error (if still there).
            if self._machines.get(machine.name) is machine:
                del self._machines[machine.name]
            if not task.cancelled():
                _log.warning("%s: %s", machine.name, task.exception())

    # --- events -----------------------------------------------------------------------
    def _publish(self, machine: Machine, event: str, data: dict[str, object]) -> None:
        """Fan an event out to every subscriber without ever blocking the publisher."""
        self.events.publish({"machine": machine.name, "event": event, "data": data})

    def subscribe(self) -> contextlib.AbstractContextManager[asyncio.Queue[wire.EventJson]]:
        """The daemon's events while the block runs; a subscriber that does not keep up
        loses events and is told so (EventsLost) rather than slowing the VMs or the others."""
        return self.events.subscribe()

    # --- adoption after a restart -------------------------------------------------------
    async def adopt_all(self) -> None:
        """Reconcile with what an earlier daemon left in machines/ (before serving).

        Every VM whose recorded processes are still the same ones is adopted; unreadable
        or other-version state is logged and its processes stopped and files removed.
        A name is taken once: a second record for it is discarded (never run a VM twice).
        """
        for entry in sorted(self.machines_dir.iterdir(), key=lambda p: p.name):
            if entry.is_symlink() or not entry.is_dir():
                _log.warning("removing unexpected entry %s in the machines directory", entry)
                entry.unlink(missing_ok=True)
                continue
            try:
                data = read_json(entry / "state.json")
                if not isinstance(data, dict) or data.get("version") != STATE_FORMAT_VERSION:
                    raise ValueError(
                        f"unsupported state format version {data.get('version') if isinstance(data, dict) else data!r}"
                    )
                if not state_seal.trusted_state(entry):  # parsing is harmless, acting on it is not
                    raise ValueError("state.json is not the one this daemon wrote (docs/security.md)")
                record = MachineRecord.from_json(data["machine"])
                spec = VmSpec.from_json(record.spec)
            except (OSError, ValueError, KeyError, TypeError, VmspawnError) as exc:
                _log.warning("discarding %s: unreadable state (%s)", entry.name, exc)
                await discard_leftovers(entry)
                continue
            if record.name in self._machines:
                _log.error("discarding %s: machine %s is already adopted from another record", entry.name, record.name)
                await discard_leftovers(entry)
                continue
            machine = Machine(record, spec, entry, self._publish, self.settings)
            try:
                keep = await machine.adopt()
            except Exception:
                _log.exception("%s: adoption failed; stopping it", record.name)
                await discard_leftovers(entry)
                continue
            if keep:
                self._machines[record.name] = machine

    # --- held VMs: a VM whose life is bound to a client's call (HoldMachine, SpawnAndHold) ---
    @contextlib.asynccontextmanager
    async def held_by_caller(self, machine: Machine) -> AsyncIterator[None]:
        """Around a holding call's replies: if the call ends before its VM did — the caller
        hung up (CancelledError while waiting) or a reply could not be sent (GeneratorExit at
        the yield) — the VM is ended and forgotten."""
        try:
            yield
        except BaseException:
            if not machine.record.state.is_final and not machine.detached:
                self.end_for_departed_holder(machine)
            raise

    @staticmethod
    async def until_ended(machine: Machine) -> None:
        rec = machine.record
        while not rec.state.is_final:
            with contextlib.suppress(Timeout):
                await machine.wait_for(lambda: rec.state.is_final, 3600.0, "hold")

    def end_for_departed_holder(self, machine: Machine) -> None:
        """End `machine` on a task of the manager's (the holder's own task is being cancelled)."""
        self._held.spawn(self._end_held(machine), f"end {machine.name} for its departed holder")

    def _still_managed(self, machine: Machine) -> bool:
        """Not failed to start, nor removed (and its name not reused) meanwhile."""
        return self._machines.get(machine.name) is machine

    async def _end_held(self, machine: Machine) -> None:
        """The holder of a HoldMachine/SpawnAndHold call went away (e.g. `vmspawnctl run` was
        killed): end its VM and forget it, so the name is free again, as after systemd-vmspawn
        dies. A VM still starting is let finish its start first (a failed start cleans itself)."""
        try:
            if machine.starting is not None:
                await asyncio.wait({machine.starting})  # its outcome is the start's business
            if machine.record.state.is_final or not self._still_managed(machine):
                return
            with contextlib.suppress(VmspawnError):
                await machine.terminate()
            await machine.wait_for(lambda: machine.record.state.is_final, 60.0, "end a held VM")
            if self._still_managed(machine):
                await self.remove(machine.name)
        except VmspawnError as exc:
            _log.warning("%s: could not end the VM of a departed holder: %s", machine.name, exc)

    # --- lifecycle ---------------------------------------------------------------------
    async def remove(self, name: str) -> None:
        machine = self.get(name)
        if not machine.record.state.is_final:
            raise InvalidState(name, machine.record.state.value, "remove")
        del self._machines[name]
        machine.remove_files()
        self._publish(machine, "Removed", {})  # the name is free again

    async def shutdown(self, stop_vms: bool) -> None:
        """Daemon exit: leave VMs running (default) or power them off."""
        await self._starts.wait()  # a VM half started is finished or unwound, never left half
        await self._held.wait()  # a VM whose holder left is ended, as the holder would have wanted
        machines = list(self._machines.values())
        if stop_vms:
            await asyncio.gather(*(m.power_off() for m in machines if m.record.state.is_active), return_exceptions=True)
        for machine in machines:
            await machine.detach()
