# SPDX-License-Identifier: LGPL-2.1-or-later
# mypy: disable-error-code="valid-type,name-defined"
"""A private system-type dbus-daemon plus stand-ins for org.freedesktop.machine1 and
org.freedesktop.systemd1, written with dbus-fast.

The exported methods carry the names and signatures of systemd's introspection data
(RegisterMachine sayssus, UnregisterMachine s, StartTransientUnit ssa(sv)a(sa(sv)) → o,
KillUnit ssi, AttachProcessesToUnit ssau, AbandonScope s, UnrefUnit s), so a call with a wrong signature fails as it
would against systemd. Every call is recorded with its signature and arguments.
dbus-fast cannot receive `h` inside a variant as a service (docs/reference/libraries.md §3): PIDFDs
arrive as indices, so the stand-in only records that they came and can refuse them
like a manager without pidfd support.
"""

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, method

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow send_type="signal"/>
  </policy>
</busconfig>
"""


@dataclasses.dataclass
class PrivateBus:
    address: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def private_system_bus() -> Iterator[PrivateBus]:
    """A real dbus-daemon for a system-type bus in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="vmspawnd-dbus-") as tmp:
        config = Path(tmp) / "system.conf"
        config.write_text(BUS_CONFIG.format(socket=Path(tmp) / "bus"))
        process = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
            stdout=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            address = process.stdout.readline().decode().strip()
            assert address, "dbus-daemon printed no address"
            yield PrivateBus(address, process)
        finally:
            process.terminate()
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def _plain(value: Any) -> Any:
    """Variants → (signature, value) tuples, lists kept, for easy assertions."""
    if isinstance(value, Variant):
        return (value.signature, _plain(value.value))
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value
    return value


@dataclasses.dataclass
class Call:
    member: str
    signature: str
    args: list[Any]


class Machine1Manager(ServiceInterface):
    """org.freedesktop.machine1.Manager, only the two methods vmspawn uses."""

    def __init__(self, calls: list[Call]) -> None:
        super().__init__("org.freedesktop.machine1.Manager")
        self.calls = calls
        self.machines: set[str] = set()

    @method()
    def RegisterMachine(self, name: "s", id: "ay", service: "s", class_: "s", leader: "u", root_directory: "s") -> "":  # noqa: F821 - dbus-fast signature strings
        self.calls.append(Call("RegisterMachine", "sayssus", [name, bytes(id), service, class_, leader, root_directory]))
        if name in self.machines:
            raise DBusError("org.freedesktop.machine1.MachineExists", f"Machine '{name}' already exists")
        self.machines.add(name)

    @method()
    def UnregisterMachine(self, name: "s") -> "":  # noqa: F821 - dbus-fast signature strings
        self.calls.append(Call("UnregisterMachine", "s", [name]))
        if name not in self.machines:
            raise DBusError("org.freedesktop.machine1.NoSuchMachine", f"No machine '{name}' known")
        self.machines.discard(name)


class Systemd1Manager(ServiceInterface):
    """org.freedesktop.systemd1.Manager: transient scopes and their end."""

    def __init__(self, calls: list[Call], bus: MessageBus, accept_pidfds: bool, job_result: str) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.calls = calls
        self.bus = bus
        self.accept_pidfds = accept_pidfds
        self.job_result = job_result
        self.controllers: dict[str, str] = {}
        self._job = 0

    @method()
    def StartTransientUnit(self, name: "s", mode: "s", properties: "a(sv)", aux: "a(sa(sv))") -> "o":  # noqa: F821 - dbus-fast signature strings
        self.calls.append(Call("StartTransientUnit", "ssa(sv)a(sa(sv))", [name, mode, _plain(properties), _plain(aux)]))
        names = [p[0] for p in properties]
        if "PIDFDs" in names and not self.accept_pidfds:
            raise DBusError("org.freedesktop.DBus.Error.UnknownProperty", "Cannot set property PIDFDs, or unknown property.")
        for prop_name, value in properties:
            if prop_name == "Controller":
                self.controllers[name] = value.value
        self._job += 1
        job_id, path = self._job, f"/org/freedesktop/systemd1/job/{self._job}"
        # systemd announces the job's end after the reply that names it.
        asyncio.get_running_loop().call_soon(self._job_removed, job_id, path, name)
        return path

    def _job_removed(self, job_id: int, path: str, unit: str) -> None:
        self.bus.send(
            Message.new_signal(
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "JobRemoved",
                "uoss",
                [job_id, path, unit, self.job_result],
            )
        )

    @method()
    def KillUnit(self, name: "s", whom: "s", signal: "i") -> "":  # noqa: F821 - dbus-fast signature strings
        self.calls.append(Call("KillUnit", "ssi", [name, whom, signal]))

    @method()
    def AttachProcessesToUnit(self, name: "s", subcgroup: "s", pids: "au") -> "":  # noqa: F821 - dbus-fast signature strings
        self.calls.append(Call("AttachProcessesToUnit", "ssau", [name, subcgroup, list(pids)]))

    @method()
    def AbandonScope(self, name: "s") -> "":  # noqa: F821 - dbus-fast signature strings
        self.calls.append(Call("AbandonScope", "s", [name]))

    @method()
    def UnrefUnit(self, name: "s") -> "":  # noqa: F821 - dbus-fast signature strings
        self.calls.append(Call("UnrefUnit", "s", [name]))

    def request_stop(self, unit: str, unit_path: str) -> None:
        """What PID 1 does on `systemctl stop NAME.scope`: RequestStop to the controller."""
        message = Message.new_signal(unit_path, "org.freedesktop.systemd1.Scope", "RequestStop", "", [])
        controller = self.controllers.get(unit)
        if controller:
            message.destination = controller
        self.bus.send(message)


@dataclasses.dataclass
class Services:
    bus: MessageBus
    calls: list[Call]
    machine1: Machine1Manager | None
    systemd1: Systemd1Manager | None

    def members(self) -> list[str]:
        return [c.member for c in self.calls]

    async def close(self) -> None:
        self.bus.disconnect()
        with contextlib.suppress(Exception):
            await self.bus.wait_for_disconnect()


async def start_services(
    address: str, machine1: bool = True, systemd1: bool = True, accept_pidfds: bool = False, job_result: str = "done"
) -> Services:
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    calls: list[Call] = []
    m1 = s1 = None
    if machine1:
        m1 = Machine1Manager(calls)
        bus.export("/org/freedesktop/machine1", m1)
        await bus.request_name("org.freedesktop.machine1")
    if systemd1:
        s1 = Systemd1Manager(calls, bus, accept_pidfds, job_result)
        bus.export("/org/freedesktop/systemd1", s1)
        await bus.request_name("org.freedesktop.systemd1")
    return Services(bus, calls, m1, s1)


def environment_for(address: str) -> dict[str, str]:
    return dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
