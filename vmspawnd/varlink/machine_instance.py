# SPDX-License-Identifier: LGPL-2.1-or-later
"""systemd's per-VM control interface, io.systemd.MachineInstance, for one VM.

Served on machines/ID/control (reported as `controlAddress`, registered with machined),
so stock tools that speak it (machinectl 261+, varlinkctl) control our VMs as they
control systemd-vmspawn's. Names, fields and errors are verbatim from systemd
(docs/interfaces/io.systemd.MachineInstance.varlink; a test compares the rendering).
Each method maps to QMP as systemd-vmspawn 261 does; QMP calls are bounded, and a
missing QMP connection is `NotConnected`.
"""

import collections.abc
import typing
from pathlib import Path

from asyncvarlink import TypedVarlinkErrorReply, VarlinkInterface, VarlinkInterfaceRegistry, varlinkmethod, varlinksignature
from asyncvarlink.conversion import ForeignVarlinkType, ObjectVarlinkType, OptionalVarlinkType, VarlinkType
from asyncvarlink.serviceinterface import VarlinkServiceInterface

from vmspawnd import __version__
from vmspawnd.control import ControlledMachine, ControlServer, ServeControl
from vmspawnd.errors import InvalidState, NotConnected
from vmspawnd.host.peer import PeerPolicy
from vmspawnd.runtime_dir import bind_listening_socket
from vmspawnd.varlink.server import HardenedUnixServer, serve_unix

INTERFACE = "io.systemd.MachineInstance"


def _error(name: str) -> type[TypedVarlinkErrorReply]:
    return type(
        name, (TypedVarlinkErrorReply,), {"Parameters": type("Parameters", (), {"__annotations__": {}})}, interface=INTERFACE
    )


NotConnectedError = _error("NotConnected")
NotSupportedError = _error("NotSupported")
NoSuchStorage = _error("NoSuchStorage")
StorageExists = _error("StorageExists")
StorageImmutable = _error("StorageImmutable")
BadConfig = _error("BadConfig")
ConfigNotSupported = _error("ConfigNotSupported")


class DescribeResult(typing.TypedDict):
    running: bool
    status: str


class EventResult(typing.TypedDict):
    event: str
    data: typing.Any


class MachineInstanceInterface(VarlinkInterface, name=INTERFACE):
    """Control one virtual machine (systemd's per-VM interface)."""

    errors = (NotConnectedError, NotSupportedError, NoSuchStorage, StorageExists, StorageImmutable, BadConfig, ConfigNotSupported)

    def __init__(self, machine: ControlledMachine) -> None:
        self._machine = machine

    async def _qmp(self, command: str) -> object:
        try:
            return await self._machine.qmp_execute(command)
        except NotConnected:
            raise NotConnectedError() from None

    @varlinkmethod
    async def Terminate(self) -> None:
        """Forcefully terminate the machine immediately."""
        await self._lifecycle(self._machine.terminate())

    @varlinkmethod
    async def PowerOff(self) -> None:
        """Request a clean shutdown of the machine."""
        # As `vmspawnctl stop`: the ACPI power button, escalating after the deadline
        # (vmspawn only presses the button). Answered once the button is pressed.
        await self._lifecycle(self._machine.request_power_off())

    @varlinkmethod
    async def Reboot(self) -> None:
        """Reboot the machine."""
        await self._lifecycle(self._machine.reboot())

    @varlinkmethod
    async def Pause(self) -> None:
        """Pause/freeze the machine."""
        await self._lifecycle(self._machine.pause())

    @varlinkmethod
    async def Resume(self) -> None:
        """Resume a paused machine."""
        await self._lifecycle(self._machine.resume())

    async def _lifecycle(self, request: collections.abc.Awaitable[None]) -> None:
        """systemd's interface has no InvalidState: a VM that is not running (or whose
        QEMU cannot be reached) is NotConnected to its caller."""
        try:
            await request
        except (NotConnected, InvalidState):
            raise NotConnectedError() from None

    @varlinkmethod
    async def Describe(self) -> DescribeResult:
        """Query the current status of the machine."""
        status = await self._qmp("query-status")
        assert isinstance(status, dict)
        return {"running": bool(status.get("running")), "status": str(status.get("status", "unknown"))}

    @varlinkmethod(delay_generator=False, allow_foreign=True)
    async def SubscribeEvents(self, *, filter: list[str] | None = None) -> collections.abc.AsyncIterator[EventResult]:
        """Subscribe to machine events; requires the "more" flag; a stream of events as they occur."""
        with self._machine.subscribe_qmp() as queue:
            yield {"event": "READY", "data": None}
            while True:
                name, data = await queue.get()
                if name is None:
                    # QEMU is gone: systemd ends its subscriptions the same way (no backend).
                    raise NotConnectedError()
                if filter is None or name in filter:
                    yield {"event": name, "data": data}

    @varlinkmethod
    def AddStorage(self, *, fileDescriptorIndex: int, name: str, config: str | None) -> None:
        """Attach a storage volume (passed as a file descriptor) to the running machine."""
        raise NotSupportedError()

    @varlinkmethod
    def RemoveStorage(self, *, name: str) -> None:
        """Detach a previously attached storage volume."""
        raise NotSupportedError()

    @varlinkmethod
    def ReplaceStorage(self, *, fileDescriptorIndex: int, name: str) -> None:
        """Replace the backing of a previously attached storage volume in place."""
        raise NotSupportedError()


def _make_data_optional() -> None:
    """systemd declares `data: ?object`; asyncvarlink folds Optional[Any] into plain
    `object`, so the one field is fixed up here to render (and validate) as systemd's."""
    signature = varlinksignature(MachineInstanceInterface.SubscribeEvents)
    assert signature is not None
    signature.return_type = ObjectVarlinkType(
        {"event": VarlinkType.from_type_annotation(str), "data": OptionalVarlinkType(ForeignVarlinkType())}
    )


_make_data_optional()


class _ControlSocket:
    """A served control socket, as the VM sees it (vmspawnd.control.ControlServer)."""

    def __init__(self, server: HardenedUnixServer) -> None:
        self._server = server

    def close(self, drain_timeout: float) -> None:
        self._server.close_gracefully(drain_timeout)


async def serve_machine_instance(machine: ControlledMachine, path: Path, policy: PeerPolicy) -> ControlServer:
    """Serve io.systemd.MachineInstance (and introspection) for `machine` at `path` (0600)."""
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(MachineInstanceInterface(machine))
    registry.register_interface(
        VarlinkServiceInterface("vmspawnd", "vmspawnd", __version__, "https://github.com/vmspawnd/vmspawnd", registry)
    )
    return _ControlSocket(await serve_unix(bind_listening_socket(path, 0o600), registry, policy))


def machine_instance_servers(policy: PeerPolicy) -> ServeControl:
    """What the daemon puts in `Settings.serve_control`: each VM's socket admits `policy`'s peers."""

    async def serve(machine: ControlledMachine, path: Path) -> ControlServer:
        return await serve_machine_instance(machine, path, policy)

    return serve
