# SPDX-License-Identifier: LGPL-2.1-or-later
"""The VM's unit with systemd PID 1 (docs/reference/systemd-vmspawn.md §5.2).

The pure half builds what PID 1 is sent: the transient `NAME.scope`'s `a(sv)`
(`--property` assignments through `unit_properties`) and the org.freedesktop.systemd1
messages, golden-tested without a bus. The effects are thin:

* `start_scope`: `StartTransientUnit(ssa(sv)a(sa(sv)))` holding every process of the VM
  (PIDFDs, else PIDs), then the job awaited through `JobRemoved`; `RequestStop` on the
  scope is passed to the caller.
* `unit_is_delegated`: whether a caller's unit takes processes (`--keep-unit`), before
  `AttachProcessesToUnit` moves them there.
* `systemd_is_service_manager`: units exist only where systemd manages the system.

Environment (documented in docs/vmspawnd.md):
  VMSPAWND_SYSTEMD_BOOTED    "1"/"0" overrides the `/run/systemd/system` check
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from vmspawnd.errors import DBusCallError
from vmspawnd.host.dbus import add_match_message, bus_label_escape, connect_bus, dbus_call
from vmspawnd.host.unit_properties import convert_unit_property
from vmspawnd.spec.parsers import mangle_unit_name

_log = logging.getLogger(__name__)

ENV_SYSTEMD_BOOTED = "VMSPAWND_SYSTEMD_BOOTED"
DEFAULT_SLICE = "machine.slice"
GUESTS_UNIT = "vmspawnd-guests.service"
JOB_TIMEOUT = 30.0

SYSTEMD1 = "org.freedesktop.systemd1"
SYSTEMD1_PATH = "/org/freedesktop/systemd1"
SYSTEMD1_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD1_SCOPE = "org.freedesktop.systemd1.Scope"

# What PID 1 answers to a property it does not know (a systemd without PIDFDs): PIDs are sent instead.
_NO_SUCH_PROPERTY = (
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.PropertyReadOnly",
    "org.freedesktop.systemd1.UnknownProperty",
)

# ---------------------------------------------------------------------------------------
# pure part


def systemd_is_service_manager(environ: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists) -> bool:
    """sd_booted(): systemd manages this system when /run/systemd/system exists."""
    override = environ.get(ENV_SYSTEMD_BOOTED)
    if override is not None:
        return override.strip().lower() in ("1", "yes", "true", "on")
    return exists("/run/systemd/system")


def unit_object_path(unit: str) -> str:
    return f"{SYSTEMD1_PATH}/unit/{bus_label_escape(unit)}"


def scope_unit_name(machine_name: str) -> str:
    return mangle_unit_name(machine_name, ".scope")


def scope_properties(
    machine_name: str,
    slice_name: str | None,
    pids: Sequence[int],
    assignments: Sequence[str],
    controller: str | None,
    pidfd_count: int = 0,
) -> list[list[object]]:
    """The `a(sv)` of StartTransientUnit for the VM's scope (docs/reference/systemd-vmspawn.md §5.2).

    With `pidfd_count` the processes go as `PIDFDs` (`ah`, indices into the message's
    fds); otherwise as `PIDs` (`au`)."""
    props: list[list[object]] = [
        ["Description", Variant("s", f"Virtual Machine {machine_name}")],
        ["CollectMode", Variant("s", "inactive-or-failed")],
        ["AddRef", Variant("b", True)],
        ["Slice", Variant("s", mangle_unit_name(slice_name or DEFAULT_SLICE, ".slice"))],
        # Stopped only after vmspawnd-guests.service powered the guest off through ACPI at
        # shutdown (stop order is the reverse of start order): without it, PID 1 would
        # SIGTERM QEMU in parallel with the power-off, as libvirt-guests avoids too.
        ["Before", Variant("as", [GUESTS_UNIT])],
    ]
    if controller:
        props.append(["Controller", Variant("s", controller)])
    if pidfd_count:
        props.append(["PIDFDs", Variant("ah", list(range(pidfd_count)))])
    else:
        props.append(["PIDs", Variant("au", list(pids))])
    for assignment in assignments:
        name, value = convert_unit_property(assignment)
        props.append([name, value])
    return props


def _systemd_call(member: str, signature: str, body: list[object], unix_fds: list[int] | None = None) -> Message:
    return Message(
        destination=SYSTEMD1,
        path=SYSTEMD1_PATH,
        interface=SYSTEMD1_MANAGER,
        member=member,
        signature=signature,
        body=body,
        unix_fds=unix_fds or [],
    )


def start_transient_unit_message(unit: str, properties: list[list[object]], unix_fds: list[int] | None = None) -> Message:
    return _systemd_call("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", properties, []], unix_fds)


def attach_processes_message(unit: str, pids: Sequence[int]) -> Message:
    """AttachProcessesToUnit(ssau): move processes into an existing unit's cgroup (systemd 238+)."""
    return _systemd_call("AttachProcessesToUnit", "ssau", [unit, "", list(pids)])


def kill_unit_message(unit: str, whom: str = "all", signo: int = signal.SIGKILL) -> Message:
    return _systemd_call("KillUnit", "ssi", [unit, whom, int(signo)])


def abandon_scope_message(unit: str) -> Message:
    return _systemd_call("AbandonScope", "s", [unit])


def unref_unit_message(unit: str) -> Message:
    return _systemd_call("UnrefUnit", "s", [unit])


JOB_REMOVED_MATCH = f"type='signal',sender='{SYSTEMD1}',path='{SYSTEMD1_PATH}',interface='{SYSTEMD1_MANAGER}',member='JobRemoved'"


def request_stop_match(unit: str) -> str:
    return f"type='signal',path='{unit_object_path(unit)}',interface='{SYSTEMD1_SCOPE}',member='RequestStop'"


def unit_delegate_message(unit: str) -> Message:
    """Properties.Get(Unit-type interface, "Delegate") on `unit`'s object (services and
    scopes both have it; any other type answers with an error)."""
    interface = f"{SYSTEMD1}.{'Scope' if unit.endswith('.scope') else 'Service'}"
    return Message(
        destination=SYSTEMD1,
        path=unit_object_path(unit),
        interface="org.freedesktop.DBus.Properties",
        member="Get",
        signature="ss",
        body=[interface, "Delegate"],
    )


# ---------------------------------------------------------------------------------------
# effects


async def unit_is_delegated(unit: str, is_root: bool) -> bool:
    """Whether PID 1 lets other processes join `unit` (AttachProcessesToUnit works only on
    units with Delegate=yes). Raises OSError/TimeoutError/DBusCallError when it cannot tell."""
    bus = await connect_bus(is_root)
    try:
        reply = await dbus_call(bus, unit_delegate_message(unit))
    finally:
        bus.disconnect()
    value = reply.body[0]
    return bool(value.value if isinstance(value, Variant) else value)


class ScopeStart:
    """A scope PID 1 accepted to start. The unit exists from then on, whatever its start job
    ends with, so the caller records it for teardown before it waits for the job."""

    def __init__(self, unit: str, job: str, results: Mapping[str, str], changed: asyncio.Event) -> None:
        self.unit = unit
        self._job = job
        self._results = results  # job object path → result, filled from JobRemoved
        self._changed = changed

    async def wait(self) -> None:
        """Until the start job is done (JOB_TIMEOUT); a job that ends otherwise raises DBusCallError."""
        async with asyncio.timeout(JOB_TIMEOUT):
            while self._job not in self._results:
                self._changed.clear()
                await self._changed.wait()
        if self._results[self._job] != "done":
            raise DBusCallError(
                "org.freedesktop.systemd1.JobFailed",
                f"starting {self.unit} ended with {self._results[self._job]!r}",
            )


async def start_scope(
    bus: MessageBus,
    machine_name: str,
    slice_name: str | None,
    assignments: Sequence[str],
    pids: Sequence[int],
    on_request_stop: Callable[[], object] | None,
) -> ScopeStart:
    """StartTransientUnit NAME.scope holding `pids` (docs/reference/systemd-vmspawn.md §5.2).

    The bus keeps watching: `RequestStop` on the scope calls `on_request_stop` for as long
    as `bus` stays connected."""
    unit = scope_unit_name(machine_name)
    unit_path = unit_object_path(unit)
    results: dict[str, str] = {}
    changed = asyncio.Event()

    def on_message(message: Message) -> None:
        if message.message_type != MessageType.SIGNAL:
            return
        if message.interface == SYSTEMD1_MANAGER and message.member == "JobRemoved" and message.signature == "uoss":
            results[message.body[1]] = message.body[3]
            changed.set()
        elif message.interface == SYSTEMD1_SCOPE and message.member == "RequestStop" and message.path == unit_path:
            _log.info("%s: VM termination requested by the service manager", machine_name)
            if on_request_stop is not None:
                on_request_stop()

    # Subscribed before the call: the job may end before StartTransientUnit's reply arrives.
    bus.add_message_handler(on_message)
    await dbus_call(bus, add_match_message(JOB_REMOVED_MATCH))
    await dbus_call(bus, add_match_message(request_stop_match(unit)))

    pidfds: list[int] = []
    try:
        for pid in pids:
            pidfds.append(os.pidfd_open(pid))
    except OSError:
        for fd in pidfds:
            os.close(fd)
        pidfds = []
    try:
        try:
            props = scope_properties(machine_name, slice_name, pids, assignments, bus.unique_name, len(pidfds))
            reply = await dbus_call(bus, start_transient_unit_message(unit, props, pidfds or None))
        except DBusCallError as exc:
            if not pidfds or exc.name not in _NO_SUCH_PROPERTY:
                raise
            _log.debug("%s: the service manager does not take PIDFDs (%s), using PIDs", machine_name, exc)
            props = scope_properties(machine_name, slice_name, pids, assignments, bus.unique_name)
            reply = await dbus_call(bus, start_transient_unit_message(unit, props))
    finally:
        for fd in pidfds:
            os.close(fd)
    return ScopeStart(unit, reply.body[0], results, changed)
