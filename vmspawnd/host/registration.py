# SPDX-License-Identifier: LGPL-2.1-or-later
"""A VM's place with systemd: its unit, then its registration with systemd-machined
(docs/reference/systemd-vmspawn.md §5.1, §5.2).

The orchestrator the daemon calls: `plan()` decides without I/O what to do for one VM,
`register_machine()` does it with `scope` (the VM's unit with PID 1) and `machined`
(Register over Varlink, RegisterMachine over D-Bus), and the `Registration` it returns
undoes it in `close()`. `RequestStop` on the scope ends the VM.

`--register` is tri-state here (a listed deviation from 259): None = auto (try, and
skip quietly when machined is absent), True = a failure fails the start at step
"register", False = don't register. Unregistering and scope teardown only log errors:
the VM is gone by then and nothing can be done about it.

Environment (documented in docs/vmspawnd.md): VMSPAWND_MACHINED_ADDRESS (`machined`),
VMSPAWND_SYSTEMD_BOOTED (`scope`), and DBUS_SYSTEM_BUS_ADDRESS / DBUS_SESSION_BUS_ADDRESS,
honoured by dbus-fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

from dbus_fast import Message
from dbus_fast.aio import MessageBus
from dbus_fast.errors import InvalidAddressError

from vmspawnd.errors import DBusCallError, StartFailed, VarlinkCallError
from vmspawnd.host.dbus import connect_bus, dbus_call
from vmspawnd.host.machined import (
    RegistrationInfo,
    machined_address,
    pidfd_id,
    register_with_machined,
    unregister_machine_message,
    varlink_call,
)
from vmspawnd.host.scope import (
    abandon_scope_message,
    attach_processes_message,
    kill_unit_message,
    scope_unit_name,
    start_scope,
    systemd_is_service_manager,
    unref_unit_message,
)
from vmspawnd.tasks import TaskOwner

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do for one VM, decided without I/O."""

    register: bool
    required: bool
    own_scope: bool  # a NAME.scope of ours holding every process of the VM
    join_unit: bool  # --keep-unit: every process of the VM joins the calling client's unit


def plan(register: bool | None, keep_unit: bool, systemd_booted: bool) -> Plan:
    """Units exist only where systemd manages the system. Without `--keep-unit` the VM gets
    a scope of its own, which vmspawnd creates with all of the VM's processes in it (vmspawn
    258+ asks machined to allocate it when root, but machined's scope holds only the
    leader, and the reaper, swtpm and virtiofsd would stay in vmspawnd.service); with it,
    the processes join the unit of the client that asked, as vmspawn's own processes stay
    in the unit vmspawn runs in. Registration with machined comes after, so machined
    finds the unit from the leader's cgroup."""
    wants = register is not False
    return Plan(
        register=wants,
        required=register is True,
        own_scope=systemd_booted and not keep_unit,
        join_unit=systemd_booted and keep_unit,
    )


class Registration:
    """What was registered and allocated for one VM; `close()` undoes it, logging failures."""

    def __init__(self, name: str, is_root: bool) -> None:
        self.name = name
        self.is_root = is_root
        self.varlink_address: str | None = None  # registered over Varlink here
        self.dbus_registered = False
        self.scope_unit: str | None = None  # allocated by us (stopped in close())
        self.unit: str | None = None  # the unit holding the VM's processes: our scope or the caller's
        self.bus: MessageBus | None = None
        self._tasks = TaskOwner(f"registration of {name}")  # stop requests from machined
        self._closed = False

    @property
    def registered(self) -> bool:
        return self.varlink_address is not None or self.dbus_registered

    async def bus_connection(self) -> MessageBus:
        if self.bus is None:
            self.bus = await connect_bus(self.is_root)
        return self.bus

    async def close(self) -> None:
        """Unregister and drop the scope: AbandonScope, KillUnit(all, SIGKILL), UnrefUnit
        (docs/reference/systemd-vmspawn.md §5.2)."""
        if self._closed:
            return
        self._closed = True
        if self.varlink_address is not None:
            try:
                await varlink_call(self.varlink_address, "io.systemd.Machine.Unregister", {"name": self.name})
            except (OSError, TimeoutError, VarlinkCallError, ValueError) as exc:
                _log.warning("%s: could not unregister from machined: %s", self.name, exc)
        if self.dbus_registered:
            await self._quietly(unregister_machine_message(self.name), "unregister from machined")
        if self.scope_unit is not None:
            for message in (
                abandon_scope_message(self.scope_unit),
                kill_unit_message(self.scope_unit),
                unref_unit_message(self.scope_unit),
            ):
                await self._quietly(message, f"{message.member} {self.scope_unit}", debug=True)
        # A running stop request is not awaited: it waits for the VM's end, which is what
        # called us (it finishes on its own; _tasks holds it until then).
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await self.bus.wait_for_disconnect()
            self.bus = None

    async def _quietly(self, message: Message, what: str, debug: bool = False) -> None:
        try:
            bus = await self.bus_connection()
            await dbus_call(bus, message)
        except (OSError, TimeoutError, DBusCallError, Exception) as exc:  # noqa: BLE001 - teardown only logs
            (_log.debug if debug else _log.warning)("%s: could not %s: %s", self.name, what, exc)

    def _run(self, callback: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            try:
                await callback()
            except Exception:  # noqa: BLE001 - a stop request racing the VM's own end
                _log.debug("%s: stop request handler failed", self.name, exc_info=True)

        self._tasks.spawn(run(), "stop request")


async def register_machine(
    info: RegistrationInfo,
    *,
    register: bool | None,
    keep_unit: bool = False,
    caller_unit: str | None = None,
    slice_name: str | None = None,
    properties: Sequence[str] = (),
    pids: Sequence[int] = (),
    on_request_stop: Callable[[], Awaitable[object]] | None = None,
    is_root: bool | None = None,
    systemd_booted: bool | None = None,
    environ: Mapping[str, str] | None = None,
    adopting: bool = False,
    machined_connection: socket.socket | None = None,
) -> Registration:
    """Put every process of the VM in its unit, then register the VM with machined (per
    `plan()`); `info.leader_pid` is the leader machined signals (the reaper).

    `pids` are all of the VM's processes; `caller_unit` is the unit of the client that
    asked for `--keep-unit`. `adopting`: a restarted daemon takes the VM back; its
    processes are in their unit already and only the registration is renewed. Raises
    StartFailed at step "scope", "keep-unit" or "register" when a required part fails;
    with auto registration an absent machined is skipped quietly and other failures
    logged. Whatever was done before a failure is undone before raising."""
    env = os.environ if environ is None else environ
    root = os.geteuid() == 0 if is_root is None else is_root
    booted = systemd_is_service_manager(env) if systemd_booted is None else systemd_booted
    steps = plan(register, keep_unit, booted)
    registration = Registration(info.name, root)
    if info.leader_pid and info.leader_pidfd_id is None:
        info = dataclasses.replace(info, leader_pidfd_id=pidfd_id(info.leader_pid))
    processes = list(pids or [info.leader_pid])
    problem = ""  # why machined refused, if it did
    try:
        if not adopting:  # an adopted VM's processes stayed in their unit across the restart
            await _place_processes(registration, steps, info, caller_unit, slice_name, properties, processes, on_request_stop)
        if steps.register:
            result = await register_with_machined(
                info,
                machined_address(env, root),
                registration.bus_connection,
                exists_ok=adopting,
                connection=machined_connection,
            )
            registration.varlink_address = result.varlink_address
            registration.dbus_registered = result.dbus_registered
            problem = result.problem
        if steps.register and not registration.registered:
            if steps.required:
                raise StartFailed("register", "could not register with systemd-machined: " + (problem or "not reachable"))
            if problem:
                _log.warning("%s: not registered with systemd-machined: %s", info.name, problem)
            else:
                _log.debug("%s: systemd-machined is not running, not registering", info.name)
        elif registration.registered:
            _log.info(
                "%s: registered with systemd-machined over %s", info.name, "Varlink" if registration.varlink_address else "D-Bus"
            )
    except BaseException:
        await registration.close()
        raise
    finally:
        if machined_connection is not None:
            machined_connection.close()  # used for Register, or not needed
    if registration.scope_unit is None and registration.bus is not None:
        # Nothing to watch on the bus: don't hold a connection per VM.
        registration.bus.disconnect()
        registration.bus = None
    return registration


async def _place_processes(
    registration: Registration,
    steps: Plan,
    info: RegistrationInfo,
    caller_unit: str | None,
    slice_name: str | None,
    properties: Sequence[str],
    processes: Sequence[int],
    on_request_stop: Callable[[], Awaitable[object]] | None,
) -> None:
    """Every process of the VM into its own scope, or (--keep-unit) into the caller's unit."""
    if steps.own_scope:
        request_stop = functools.partial(registration._run, on_request_stop) if on_request_stop is not None else None
        try:
            bus = await registration.bus_connection()
            started = await start_scope(bus, info.name, slice_name, properties, processes, request_stop)
            registration.scope_unit = started.unit  # it exists whatever its job ends with: close() ends it
            await started.wait()
        except (OSError, TimeoutError, DBusCallError, ValueError) as exc:
            raise StartFailed("scope", f"could not create {scope_unit_name(info.name)}: {exc}") from exc
        registration.unit = registration.scope_unit
    elif steps.join_unit:
        if not caller_unit:
            raise StartFailed("keep-unit", "the calling client runs in no unit of the service manager")
        try:
            bus = await registration.bus_connection()
            await dbus_call(bus, attach_processes_message(caller_unit, processes))
        except (OSError, TimeoutError, DBusCallError, InvalidAddressError) as exc:
            raise StartFailed("keep-unit", f"could not move the VM's processes into {caller_unit}: {exc}") from exc
        registration.unit = caller_unit
