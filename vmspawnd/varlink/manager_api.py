# SPDX-License-Identifier: LGPL-2.1-or-later
"""The Varlink interface io.vmspawnd.Manager.

The Python classes here are the source of truth for the IDL (asyncvarlink renders it);
interfaces/io.vmspawnd.Manager.varlink is that rendering, committed for readers and
checked by a test. The wire types are derived from the pure dataclasses (`VmSpec`,
`MachineRecord`) and the error classes from `errors`, so each field is defined once.
No `from __future__ import annotations` here: asyncvarlink reads real annotations.
"""

import asyncio
import collections.abc
import contextlib
import dataclasses
import logging
import types
import typing

from asyncvarlink import FileDescriptor, LastResult, TypedVarlinkErrorReply, VarlinkInterface, varlinkmethod, varlinksignature
from asyncvarlink.conversion import DataclassVarlinkType, ListVarlinkType, VarlinkType

from vmspawnd import errors
from vmspawnd.errors import InvalidSpec, to_camel
from vmspawnd.manager import Manager
from vmspawnd.model import MachineRecord, MachineState, ProcessRecord
from vmspawnd.qemu.console import ConsoleMode, last_lines, read_history
from vmspawnd.spec import VmSpec, parsers
from vmspawnd.varlink.server import current_peer

INTERFACE = errors.INTERFACE


_WIRE_TYPES: dict[type, type] = {}


def _wire_hint(hint: object) -> object:
    """Map nested pure dataclasses inside a hint to their camelCase wire twins."""
    if dataclasses.is_dataclass(hint):
        if hint not in _WIRE_TYPES:
            _WIRE_TYPES[hint] = _wire_dataclass(hint, hint.__name__, optional=False)  # type: ignore[arg-type,index,union-attr]
        return _WIRE_TYPES[hint]  # type: ignore[index]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is list:
        return list[_wire_hint(args[0])]  # type: ignore[misc]
    if origin is dict:
        return dict[args[0], _wire_hint(args[1])]  # type: ignore[misc,valid-type]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_wire_hint(a) for a in args)]  # type: ignore[return-value]
    return hint


def _wire_dataclass(cls: type, name: str, *, optional: bool, overrides: dict[str, object] | None = None) -> type:
    """A camelCase twin of a dataclass for asyncvarlink to validate and render."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, object, object]] = []
    for f in dataclasses.fields(cls):
        hint = (overrides or {}).get(f.name, _wire_hint(hints[f.name]))
        if not optional and f.default is not dataclasses.MISSING:
            fields.append((to_camel(f.name), hint, dataclasses.field(default=f.default)))
            continue
        if optional:
            fields.append((to_camel(f.name), hint | None, dataclasses.field(default=None)))  # type: ignore[operator]
        else:
            fields.append((to_camel(f.name), hint, dataclasses.field()))
    wire = dataclasses.make_dataclass(name, fields, kw_only=True)  # type: ignore[arg-type]
    wire.__doc__ = cls.__doc__
    return wire


VmSpecWire = _wire_dataclass(VmSpec, "VmSpec", optional=True)
ProcessWire = _wire_dataclass(ProcessRecord, "Process", optional=False)
MachineStateName = typing.Literal[tuple(s.value for s in MachineState)]  # type: ignore[valid-type]
MachineWire = _wire_dataclass(
    MachineRecord,
    "Machine",
    optional=False,
    overrides={
        "spec": VmSpecWire,
        "qemu": ProcessWire | None,
        "reaper": ProcessWire | None,
        "state": MachineStateName,
        "helpers": dict[str, ProcessWire],  # type: ignore[valid-type]
    },
)


def _typed_error(cls: type[errors.VmspawnError]) -> type[TypedVarlinkErrorReply]:
    hints = typing.get_type_hints(cls)
    params = type("Parameters", (), {"__annotations__": {to_camel(f.name): hints[f.name] for f in dataclasses.fields(cls)}})
    return type(cls.__name__, (TypedVarlinkErrorReply,), {"Parameters": params}, interface=INTERFACE)


VARLINK_ERRORS = tuple(_typed_error(cls) for cls in errors.ALL_ERRORS)


def to_wire(wire_cls: type, data: typing.Mapping[str, object] | None) -> object:
    """JSON-shaped dict → instance of a wire dataclass (nested ones included)."""
    if data is None:
        return None
    hints = typing.get_type_hints(wire_cls)
    return wire_cls(**{f.name: _convert(hints[f.name], data.get(f.name)) for f in dataclasses.fields(wire_cls)})


def _convert(hint: object, value: object) -> object:
    """Build wire dataclasses wherever the hint asks for one (also inside dicts and lists)."""
    if value is None:
        return None
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    for option in options:
        origin = typing.get_origin(option)
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return to_wire(option, value)  # type: ignore[arg-type]
        if origin is dict and isinstance(value, dict):
            return {k: _convert(typing.get_args(option)[1], v) for k, v in value.items()}
        if origin is list and isinstance(value, list):
            return [_convert(typing.get_args(option)[0], v) for v in value]
    return value


def from_wire(obj: object) -> dict[str, object]:
    """Wire dataclass → JSON-shaped dict, absent (None) fields left out."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}  # type: ignore[call-overload]


def machine_to_wire(record: MachineRecord) -> object:
    """A machine as reply data: its JSON, already in wire form (see _prevalidate_machines)."""
    return record.to_json()


class _Prevalidated(VarlinkType):
    """Declared (IDL, introspection, request validation) as `inner`, but reply values are
    the record's own JSON already: `MachineRecord.to_json()` produces exactly the declared
    shape (a unit test checks it against `inner`), and converting ~40 fields per VM field
    by field made List cost ~0.4 ms per VM (docs/performance.md)."""

    def __init__(self, inner: VarlinkType) -> None:
        self._inner = inner
        self.as_type = inner.as_type
        self.as_varlink = inner.as_varlink
        self.typedefs = inner.typedefs

    def tojson(self, obj: object, oobstate: object = None) -> typing.Any:
        return obj

    def fromjson(self, obj: typing.Any, oobstate: object = None) -> object:
        return self._inner.fromjson(obj, oobstate)  # type: ignore[arg-type]

    def subtypes(self) -> collections.abc.Iterator[VarlinkType]:
        yield self._inner


def _caller() -> tuple[int, int]:
    """The calling client's uid and pid (SO_PEERCRED); -1 and 0 when unknown."""
    peer = current_peer.get(None)
    return (peer.uid, peer.pid) if peer is not None else (-1, 0)


def _parse_signal(value: int) -> int:
    try:
        return parsers.parse_signal(value)
    except ValueError as exc:
        raise InvalidSpec("signal", str(exc)) from None


@dataclasses.dataclass(kw_only=True)
class Event:
    """One event: a VM's state change, a QMP event of its QEMU, or a notice to the subscriber."""

    machine: str | None
    event: str
    data: dict[str, typing.Any]


class ManagerInterface(VarlinkInterface, name=INTERFACE):
    """Supervise virtual machines spawned like systemd-vmspawn does, many per daemon."""

    errors = VARLINK_ERRORS

    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    @varlinkmethod(return_parameter="machine")
    async def Spawn(self, *, spec: VmSpecWire) -> MachineWire:  # type: ignore[valid-type]
        """Create and start a VM; returns once QEMU runs it. A failed start leaves nothing behind."""
        record = await self._manager.spawn(from_wire(spec), *_caller())
        return machine_to_wire(record)

    @varlinkmethod(return_parameter="machines")
    def List(self) -> list[MachineWire]:  # type: ignore[valid-type]
        """All VMs this daemon knows, running or ended (until removed); answered from memory."""
        return [machine_to_wire(r) for r in self._manager.list()]

    @varlinkmethod(return_parameter="machine")
    def Describe(self, *, name: str) -> MachineWire:  # type: ignore[valid-type]
        """One VM's record; answered from the daemon's state without asking QEMU."""
        return machine_to_wire(self._manager.get(name).record)

    @varlinkmethod(return_parameter="machine")
    async def PowerOff(self, *, name: str, deadline: float | None = None) -> MachineWire:  # type: ignore[valid-type]
        """Press the ACPI power button; after `deadline` seconds (default 60) terminate."""
        machine = self._manager.get(name)
        if deadline is not None and not 0 <= deadline <= 86400:
            raise InvalidSpec("deadline", "must be between 0 and 86400 seconds")
        await machine.power_off(60.0 if deadline is None else deadline)
        return machine_to_wire(machine.record)

    @varlinkmethod(return_parameter="machine")
    async def Terminate(self, *, name: str) -> MachineWire:  # type: ignore[valid-type]
        """Stop the VM now: QMP quit, then SIGTERM, then SIGKILL."""
        machine = self._manager.get(name)
        await machine.terminate()
        return machine_to_wire(machine.record)

    @varlinkmethod
    def Kill(self, *, name: str, signal: int | None = None) -> None:
        """Send a signal (default SIGTERM) to the VM's QEMU process."""
        signo = _parse_signal(15 if signal is None else signal)
        self._manager.get(name).kill(signo)

    @varlinkmethod(return_parameter="machine")
    async def WaitReady(self, *, name: str, timeout: float | None = None) -> MachineWire:  # type: ignore[valid-type]
        """Wait until the VM is ready (default timeout 60 s); Timeout otherwise."""
        machine = self._manager.get(name)
        await machine.wait_ready(60.0 if timeout is None else timeout)
        return machine_to_wire(machine.record)

    @varlinkmethod(return_parameter="machine")
    async def Pause(self, *, name: str) -> MachineWire:  # type: ignore[valid-type]
        """Freeze the VM's vCPUs (QMP stop)."""
        machine = self._manager.get(name)
        await machine.pause()
        return machine_to_wire(machine.record)

    @varlinkmethod(return_parameter="machine")
    async def Resume(self, *, name: str) -> MachineWire:  # type: ignore[valid-type]
        """Let a paused VM run again (QMP cont)."""
        machine = self._manager.get(name)
        await machine.resume()
        return machine_to_wire(machine.record)

    @varlinkmethod(return_parameter="machine")
    async def Reboot(self, *, name: str) -> MachineWire:  # type: ignore[valid-type]
        """Reset the VM (QMP system_reset); a reset is not a stop."""
        machine = self._manager.get(name)
        await machine.reboot()
        return machine_to_wire(machine.record)

    @varlinkmethod
    async def Remove(self, *, name: str) -> None:
        """Forget a stopped or failed VM and delete its runtime directory; frees the name."""
        await self._manager.remove(name)

    @varlinkmethod(return_parameter="event", delay_generator=False, allow_foreign=True)
    async def SubscribeEvents(
        self, *, name: str | None = None, filter: list[str] | None = None
    ) -> collections.abc.AsyncIterator[Event]:
        """Stream events (needs `more`). The first reply is `Subscribed`: events after it are
        not missed. `name` limits to one VM, `filter` to event names: StateChanged, QMP event
        names, Notify (the guest's READY/STATUS/EXIT_STATUS), QmpDisconnected/QmpReconnected,
        Removed (the VM is forgotten, its name free), EventsLost.
        """
        if name is not None:
            self._manager.get(name)
        with self._manager.subscribe() as queue:
            yield Event(machine=name, event="Subscribed", data={})
            while True:
                message = await queue.get()
                if name is not None and message["machine"] not in (name, None):
                    continue
                if filter is not None and message["event"] not in filter and message["event"] != "EventsLost":
                    continue
                yield Event(**message)  # type: ignore[arg-type]

    @varlinkmethod(return_parameter="fd")
    def OpenConsole(
        self, *, name: str, mode: str | None = None, force: bool | None = None, history: int | None = None
    ) -> FileDescriptor:
        """Attach to the VM's console (`mode` interactive, the default, or read-only): the reply
        carries one end of a stream socket (fd 0 of the message). One interactive client at a
        time (ConsoleBusy), unless `force`, which detaches the current one with a message; any
        number of read-only ones. `history` replays up to that many bytes of the console
        history first (at most 128 KiB).
        """
        if mode not in (None, "interactive", "read-only"):
            raise InvalidSpec("mode", f"{mode!r} is not a console mode (interactive or read-only)")
        machine = self._manager.get(name)
        hub = getattr(machine, "console", None)
        if hub is None:
            if machine.record.state.is_final:
                raise errors.InvalidState(name, machine.record.state.value, "open the console")
            raise errors.NotSupported(f"console of a VM with console mode {machine.spec.console}")
        theirs = hub.open(ConsoleMode(mode or "interactive"), force=bool(force), history=history or 0)
        return FileDescriptor(theirs, should_close=True)

    @varlinkmethod(return_parameter="fd")
    async def Screenshot(self, *, name: str, format: str | None = None) -> FileDescriptor:
        """The display of a `--console=gui` VM as QEMU's screendump renders it: the reply
        carries a read-only file (fd 0 of the message) holding a `png` (the default) or
        `ppm` image. NotSupported for VMs without a display.
        """
        if format not in (None, "png", "ppm"):
            raise InvalidSpec("format", f"{format!r} is not an image format (png or ppm)")
        machine = self._manager.get(name)
        fd = await machine.screenshot(format or "png")
        return FileDescriptor(fd, should_close=True)

    @varlinkmethod(return_parameter="text")
    def ReadConsoleLog(self, *, name: str, lines: int | None = None) -> str:
        """The console history kept on disk (console.log.1 + console.log, at most 2 MiB), or
        its last `lines` lines; undecodable bytes are replaced. Works after the VM ended.
        """
        machine = self._manager.get(name)
        if lines is not None and lines < 0:
            raise InvalidSpec("lines", "must not be negative")
        return last_lines(read_history(machine.paths.console_log), lines)

    @varlinkmethod(return_parameter="machine", delay_generator=False)
    async def HoldMachine(self, *, name: str) -> collections.abc.AsyncIterator[MachineWire]:  # type: ignore[valid-type]
        """Bind the VM's life to this call (needs `more`): if the caller hangs up while the VM
        runs, the VM is terminated and removed. Replies once at once and once more, last,
        when the VM has ended.
        """
        machine = self._manager.get(name)
        async with _bound_to_caller(self._manager, machine):
            yield machine_to_wire(machine.record)
            await _until_ended(machine)
        # The last reply must say so (continues=false): with delay_generator=False that is
        # LastResult, a plain final yield would be sent as "more to come".
        raise LastResult(machine_to_wire(machine.record))

    @varlinkmethod(return_parameter="machine", delay_generator=False)
    async def SpawnAndHold(self, *, spec: VmSpecWire) -> collections.abc.AsyncIterator[MachineWire]:  # type: ignore[valid-type]
        """Spawn, then HoldMachine, in one call (needs `more`); what `vmspawnctl run` uses.

        The VM's life is bound to the call from the start: a caller that dies at any point,
        even while the VM is still starting, leaves no VM behind and frees the name.
        """
        spec_json = from_wire(spec)
        name = VmSpec.from_json(spec_json).machine_name()
        try:
            await self._manager.spawn(spec_json, *_caller())
        except asyncio.CancelledError:
            with contextlib.suppress(errors.NoSuchMachine):
                _end_for_departed_holder(self._manager, self._manager.get(name))
            raise
        machine = self._manager.get(name)
        async with _bound_to_caller(self._manager, machine):
            yield machine_to_wire(machine.record)
            await _until_ended(machine)
        raise LastResult(machine_to_wire(machine.record))


@contextlib.asynccontextmanager
async def _bound_to_caller(manager: Manager, machine: typing.Any) -> collections.abc.AsyncIterator[None]:
    """Around a holding call's replies: if the call ends before its VM did — the caller
    hung up (CancelledError while waiting) or a reply could not be sent (GeneratorExit at
    the yield) — the VM is ended and forgotten."""
    try:
        yield
    except BaseException:
        if not machine.record.state.is_final and not getattr(machine, "detached", False):
            _end_for_departed_holder(manager, machine)
        raise


async def _until_ended(machine: typing.Any) -> None:
    rec = machine.record
    while not rec.state.is_final:
        with contextlib.suppress(errors.Timeout):
            await machine.wait_for(lambda: rec.state.is_final, 3600.0, "hold")


_HOLD_TASKS: set["asyncio.Task[None]"] = set()


def _end_for_departed_holder(manager: Manager, machine: typing.Any) -> None:
    """Schedule `_end_held` on a task the API owns (the caller's own task is being cancelled)."""
    _HOLD_TASKS.add(task := asyncio.get_running_loop().create_task(_end_held(manager, machine)))
    task.add_done_callback(_HOLD_TASKS.discard)


def _still_managed(manager: Manager, machine: typing.Any) -> bool:
    """Not failed to start, nor removed (and its name not reused) meanwhile."""
    with contextlib.suppress(errors.NoSuchMachine):
        return manager.get(machine.name) is machine
    return False


async def _end_held(manager: Manager, machine: typing.Any) -> None:
    """The holder of a HoldMachine/SpawnAndHold call went away (e.g. `vmspawnctl run` was
    killed): end its VM and forget it, so the name is free again, as after systemd-vmspawn
    dies. A VM still starting is let finish its start first (a failed start cleans itself)."""
    try:
        if machine.starting is not None:
            await asyncio.wait({machine.starting})  # its outcome is the start's business
        if machine.record.state.is_final or not _still_managed(manager, machine):
            return
        try:
            await machine.terminate()
        except errors.VmspawnError:
            pass
        await machine.wait_for(lambda: machine.record.state.is_final, 60.0, "end a held VM")
        if _still_managed(manager, machine):
            await manager.remove(machine.name)
    except errors.VmspawnError as exc:
        logging.getLogger(__name__).warning("%s: could not end the VM of a departed holder: %s", machine.name, exc)


def _prevalidate_machines(interface: type[VarlinkInterface]) -> None:
    """Swap the reply types that carry machines for their _Prevalidated twins."""
    for name in dir(interface):
        signature = varlinksignature(getattr(interface, name))
        if signature is None:
            continue
        fields = signature.return_type._typemap  # noqa: SLF001 — asyncvarlink 0.3.3, pinned
        for key, vtype in list(fields.items()):
            if isinstance(vtype, DataclassVarlinkType) and vtype.as_type is MachineWire:
                fields[key] = _Prevalidated(vtype)
            elif isinstance(vtype, ListVarlinkType) and isinstance(vtype._elttype, DataclassVarlinkType) and vtype._elttype.as_type is MachineWire:  # noqa: SLF001
                fields[key] = _Prevalidated(vtype)


_prevalidate_machines(ManagerInterface)
