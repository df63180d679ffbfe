# SPDX-License-Identifier: LGPL-2.1-or-later
"""The Varlink interface io.vmspawnd.Manager.

The Python classes here are the source of truth for the IDL (asyncvarlink renders it);
interfaces/io.vmspawnd.Manager.varlink is that rendering, committed for readers and
checked by a test. The types are those of vmspawnd/spec/wire.py, generated from the pure
dataclasses (`VmSpec`, `MachineRecord`), and the errors are derived from `errors`, so each
field is defined once. No `from __future__ import annotations` here: asyncvarlink reads
real annotations.
"""

import asyncio
import collections.abc
import contextlib
import dataclasses
import socket
import typing

from asyncvarlink import (
    FileDescriptor,
    LastResult,
    TypedVarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    varlinkmethod,
    varlinksignature,
)
from asyncvarlink.conversion import DataclassVarlinkType, ListVarlinkType, ObjectVarlinkType, OOBTypeState, VarlinkType
from asyncvarlink.serviceinterface import VarlinkServiceInterface
from asyncvarlink.types import JSONValue

from vmspawnd import __version__, errors, override
from vmspawnd.errors import InvalidSpec, to_camel
from vmspawnd.host.peer import PeerPolicy
from vmspawnd.manager import Manager
from vmspawnd.qemu.console import AttachMode, last_lines, read_history
from vmspawnd.spec import VmSpec, parsers, wire
from vmspawnd.varlink.server import HardenedUnixServer, current_peer, serve_unix

INTERFACE = errors.INTERFACE

# What a method that replies with a machine returns: the record's own JSON, which is already
# in the shape of wire.Machine (see _Prevalidated).
MachineReply = dict[str, object]


def _typed_error(cls: type[errors.VmspawnError]) -> type[TypedVarlinkErrorReply]:
    hints = typing.get_type_hints(cls)
    params = type("Parameters", (), {"__annotations__": {to_camel(f.name): hints[f.name] for f in dataclasses.fields(cls)}})
    return type(cls.__name__, (TypedVarlinkErrorReply,), {"Parameters": params}, interface=INTERFACE)


VARLINK_ERRORS = tuple(_typed_error(cls) for cls in errors.ALL_ERRORS)


def _spec_json(spec: wire.VmSpec) -> dict[str, object]:
    """A spec as its client sent it: JSON, the fields it left out (None here) left out."""
    return {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}


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

    @override
    def tojson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> JSONValue:
        return typing.cast(JSONValue, obj)

    @override
    def fromjson(self, obj: JSONValue, oobstate: OOBTypeState = None) -> typing.Any:
        return self._inner.fromjson(obj, oobstate)

    @override
    def subtypes(self) -> collections.abc.Iterator[VarlinkType]:
        yield self._inner


_Method = typing.TypeVar("_Method", bound=collections.abc.Callable[..., typing.Any])


def _replies_record_json(parameter: str, declared: VarlinkType) -> collections.abc.Callable[[_Method], _Method]:
    """On a varlinkmethod that replies `parameter` (declared as `declared`): send the
    method's value as it is (_Prevalidated).

    asyncvarlink 0.3.3 derives a method's reply type from annotations only; there is no way
    to give it a VarlinkType. So the reply type is set on the method's signature (the public
    `VarlinkMethodSignature.return_type`), once, when the class is built.
    """

    def set_reply_type(method: _Method) -> _Method:
        signature = varlinksignature(method)
        assert signature is not None, "put @varlinkmethod below this decorator"
        signature.return_type = ObjectVarlinkType({parameter: _Prevalidated(declared)})
        return method

    return set_reply_type


_MACHINE = DataclassVarlinkType(wire.Machine)
_replies_machine = _replies_record_json("machine", _MACHINE)
_replies_machines = _replies_record_json("machines", ListVarlinkType(_MACHINE))


def _caller() -> tuple[int, int]:
    """The calling client's uid and pid (SO_PEERCRED); -1 and 0 when unknown."""
    peer = current_peer.get(None)
    return (peer.uid, peer.pid) if peer is not None else (-1, 0)


def _snapshot_wire(data: dict[str, object]) -> wire.Snapshot:
    """A SnapshotRecord's JSON as the wire type (its spec as the wire VmSpec)."""
    spec = DataclassVarlinkType(wire.VmSpec).fromjson(typing.cast(JSONValue, data["spec"]))
    fields = {k: v for k, v in data.items() if k != "spec"}
    return wire.Snapshot(spec=spec, **fields)  # type: ignore[arg-type]


def _parse_signal(value: int) -> int:
    try:
        return parsers.parse_signal(value)
    except ValueError as exc:
        raise InvalidSpec("signal", str(exc)) from None


class ManagerInterface(VarlinkInterface, name=INTERFACE):
    """Supervise virtual machines spawned like systemd-vmspawn does, many per daemon."""

    errors = VARLINK_ERRORS

    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    async def Spawn(self, *, spec: wire.VmSpec, fromSnapshot: str | None = None) -> MachineReply:
        """Create and start a VM; returns once QEMU runs it. A failed start leaves nothing behind.

        With `fromSnapshot` (a bundle's name, or its absolute path) the VM is a clone of the
        snapshot: `spec` names it and may set what a clone may change; the rest is the
        bundle's. SnapshotIncompatible names what a restore cannot honour.
        """
        record = await self._manager.spawn(_spec_json(spec), *_caller(), from_snapshot=fromSnapshot)
        return record.to_json()

    @varlinkmethod(return_parameter="snapshot")
    async def Snapshot(
        self, *, name: str, bundle: str | None = None, output: str | None = None, stop: bool | None = None
    ) -> wire.Snapshot:
        """Pause the VM, save its state, disk and NVRAM into a new snapshot bundle, then
        resume it (or stop it, `stop`). The bundle goes to the daemon's store as `bundle`
        (default: the VM's name), or to the absolute directory `output`. A bundle holds the
        guest's memory: it is 0700/0600, readable by the daemon's user only.
        """
        record = await self._manager.snapshot(name, bundle, output, bool(stop))
        return _snapshot_wire(record.to_json())

    @varlinkmethod(return_parameter="snapshots")
    def ListSnapshots(self) -> list[wire.Snapshot]:
        """The bundles in the daemon's store (not those written to an `output` directory)."""
        return [_snapshot_wire(r.to_json()) for r in self._manager.list_snapshots()]

    @varlinkmethod
    def RemoveSnapshot(self, *, bundle: str) -> None:
        """Delete a snapshot bundle (by name, or the absolute path of an `output` bundle)."""
        self._manager.remove_snapshot(bundle)

    @_replies_machines
    @varlinkmethod(return_parameter="machines", return_type=list[wire.Machine])
    def List(self) -> list[MachineReply]:
        """All VMs this daemon knows, running or ended (until removed); answered from memory."""
        return [r.to_json() for r in self._manager.list()]

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    def Describe(self, *, name: str) -> MachineReply:
        """One VM's record; answered from the daemon's state without asking QEMU."""
        return self._manager.get(name).record.to_json()

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    async def PowerOff(self, *, name: str, deadline: float | None = None) -> MachineReply:
        """Press the ACPI power button; after `deadline` seconds (default 60) terminate."""
        machine = self._manager.get(name)
        if deadline is not None and not 0 <= deadline <= 86400:
            raise InvalidSpec("deadline", "must be between 0 and 86400 seconds")
        await machine.power_off(60.0 if deadline is None else deadline)
        return machine.record.to_json()

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    async def Terminate(self, *, name: str) -> MachineReply:
        """Stop the VM now: QMP quit, then SIGTERM, then SIGKILL."""
        machine = self._manager.get(name)
        await machine.terminate()
        return machine.record.to_json()

    @varlinkmethod
    def Kill(self, *, name: str, signal: int | None = None) -> None:
        """Send a signal (default SIGTERM) to the VM's QEMU process."""
        signo = _parse_signal(15 if signal is None else signal)
        self._manager.get(name).kill(signo)

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    async def WaitReady(self, *, name: str, timeout: float | None = None) -> MachineReply:
        """Wait until the VM is ready (default timeout 60 s); Timeout otherwise."""
        machine = self._manager.get(name)
        await machine.wait_ready(60.0 if timeout is None else timeout)
        return machine.record.to_json()

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    async def Pause(self, *, name: str) -> MachineReply:
        """Freeze the VM's vCPUs (QMP stop)."""
        machine = self._manager.get(name)
        await machine.pause()
        return machine.record.to_json()

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    async def Resume(self, *, name: str) -> MachineReply:
        """Let a paused VM run again (QMP cont)."""
        machine = self._manager.get(name)
        await machine.resume()
        return machine.record.to_json()

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine)
    async def Reboot(self, *, name: str) -> MachineReply:
        """Reset the VM (QMP system_reset); a reset is not a stop."""
        machine = self._manager.get(name)
        await machine.reboot()
        return machine.record.to_json()

    @varlinkmethod
    async def Remove(self, *, name: str) -> None:
        """Forget a stopped or failed VM and delete its runtime directory; frees the name."""
        await self._manager.remove(name)

    @varlinkmethod(return_parameter="event", delay_generator=False, allow_foreign=True)
    async def SubscribeEvents(
        self, *, name: str | None = None, filter: list[str] | None = None
    ) -> collections.abc.AsyncIterator[wire.Event]:
        """Stream events (needs `more`). The first reply is `Subscribed`: events after it are
        not missed. `name` limits to one VM, `filter` to event names: StateChanged, QMP event
        names, Notify (the guest's READY/STATUS/EXIT_STATUS), QmpDisconnected/QmpReconnected,
        Removed (the VM is forgotten, its name free), EventsLost.
        """
        if name is not None:
            self._manager.get(name)
        with self._manager.subscribe() as queue:
            yield wire.Event(machine=name, event="Subscribed", data={})
            while True:
                message = await queue.get()
                if name is not None and message.get("machine") not in (name, None):
                    continue
                if filter is not None and message["event"] not in filter and message["event"] != "EventsLost":
                    continue
                yield wire.Event(machine=message.get("machine"), event=message["event"], data=message["data"])

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
        theirs = hub.open(AttachMode(mode or "interactive"), force=bool(force), history=history or 0)
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

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine, delay_generator=False)
    async def HoldMachine(self, *, name: str) -> collections.abc.AsyncIterator[MachineReply]:
        """Bind the VM's life to this call (needs `more`): if the caller hangs up while the VM
        runs, the VM is terminated and removed. Replies once at once and once more, last,
        when the VM has ended.
        """
        machine = self._manager.get(name)
        async with self._manager.held_by_caller(machine):
            yield machine.record.to_json()
            await self._manager.until_ended(machine)
        # The last reply must say so (continues=false): with delay_generator=False that is
        # LastResult, a plain final yield would be sent as "more to come".
        raise LastResult(machine.record.to_json())

    @_replies_machine
    @varlinkmethod(return_parameter="machine", return_type=wire.Machine, delay_generator=False)
    async def SpawnAndHold(self, *, spec: wire.VmSpec) -> collections.abc.AsyncIterator[MachineReply]:
        """Spawn, then HoldMachine, in one call (needs `more`); what `vmspawnctl run` uses.

        The VM's life is bound to the call from the start: a caller that dies at any point,
        even while the VM is still starting, leaves no VM behind and frees the name.
        """
        spec_json = _spec_json(spec)
        name = VmSpec.from_json(spec_json).machine_name()
        try:
            await self._manager.spawn(spec_json, *_caller())
        except asyncio.CancelledError:
            with contextlib.suppress(errors.NoSuchMachine):
                self._manager.end_for_departed_holder(self._manager.get(name))
            raise
        machine = self._manager.get(name)
        async with self._manager.held_by_caller(machine):
            yield machine.record.to_json()
            await self._manager.until_ended(machine)
        raise LastResult(machine.record.to_json())


async def serve_manager(sock: socket.socket, manager: Manager, policy: PeerPolicy) -> HardenedUnixServer:
    """Serve io.vmspawnd.Manager (and introspection) for `manager` on a bound or
    socket-activated listening socket; calls from peers `policy` refuses get PermissionDenied."""
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(ManagerInterface(manager))
    registry.register_interface(
        VarlinkServiceInterface("vmspawnd", "vmspawnd", __version__, "https://github.com/vmspawnd/vmspawnd", registry)
    )
    return await serve_unix(sock, registry, policy)
