# SPDX-License-Identifier: LGPL-2.1-or-later
"""One VM: start it, supervise it, stop it, and keep its record.

Start acquires resources step by step on one AsyncExitStack; a failure at any step
unwinds exactly what was acquired, in reverse, and surfaces as StartFailed{step} with
QEMU's stderr tail. Once running, a supervisor task waits for QEMU to exit and records
why. Stop requests (PowerOff, Terminate, Kill) set the reason and climb the ladder:
ACPI power button → QMP quit → SIGTERM → SIGKILL, each step bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from vmspawnd import adoption, launch, state_seal
from vmspawnd.control import ControlServer, QmpEvent
from vmspawnd.errors import InvalidSpec, InvalidState, NotConnected, NotSupported, SnapshotIncompatible, StartFailed, Timeout
from vmspawnd.fanout import FanOut
from vmspawnd.helpers import HelperSet, start_helpers, stop_recorded_helpers
from vmspawnd.host.identity import VmIdentity, hand_over, ids_in_use, pick_identity
from vmspawnd.host.machined import info_for
from vmspawnd.host.process import ChildProcess, ReapedProcess, process_tree, spawn_reaped
from vmspawnd.host.registration import Registration, register_machine
from vmspawnd.leftovers import remove_transient_files
from vmspawnd.model import STATE_FORMAT_VERSION, MachineRecord, MachineState
from vmspawnd.outcome import ExitFacts, decide_outcome, describe_exit, describe_status, parse_host_signal
from vmspawnd.qemu.command import QemuCommand, build_qemu_command
from vmspawnd.qemu.console import ConsoleHub
from vmspawnd.qemu.guest_notify import NotifyListener, parse_exit_status
from vmspawnd.qemu.monitor import QemuMonitor
from vmspawnd.qemu.qmp import QmpError
from vmspawnd.qemu.resolve import resolve_host
from vmspawnd.qemu.resources import Channels, assemble
from vmspawnd.runtime_dir import VmPaths, json_bytes, make_private_dir, replace_private_file, write_private_file
from vmspawnd.settings import Settings
from vmspawnd.spec import ConsoleMode, VmSpec
from vmspawnd.tasks import TaskOwner

if TYPE_CHECKING:
    from vmspawnd.snapshot import CloneSource

_log = logging.getLogger(__name__)

QUIT_GRACE = 3.0
TERM_GRACE = 5.0
HELPER_EXIT_GRACE = 2.0  # how long QEMU may take to follow a helper that ended with it
DEFAULT_POWEROFF_DEADLINE = 60.0

EventCallback = Callable[["Machine", str, dict[str, object]], None]
T = TypeVar("T")


def _describe_failure(exc: Exception) -> str:
    """One line for StartFailed: an OSError names its file, anything else says itself."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    return str(exc) or type(exc).__name__


class Machine:
    """A VM and everything the daemon holds for it."""

    def __init__(self, record: MachineRecord, spec: VmSpec, directory: Path, on_event: EventCallback, settings: Settings) -> None:
        self.settings = settings
        self.record = record
        self.spec = spec
        self.directory = directory
        self.paths = VmPaths(directory)
        self._on_event = on_event
        self._qemu: ReapedProcess | None = None
        self._helpers: dict[str, ChildProcess] = {}
        self._helper_set: HelperSet | None = None  # stopped by _finish once QEMU is gone
        self._supervisor: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._changed = asyncio.Event()  # set and replaced at every change (wait_for)
        self._stop_reason: str | None = None
        self._requested_signal: int | None = None
        self._shutdown_cause: str | None = None  # the reason of QEMU's SHUTDOWN event
        self._helper_failed = False
        self._registration: Registration | None = None  # machined and the scope unit, undone in _finish
        self.console: ConsoleHub | None = None  # the daemon's console connection and history
        self.starting: asyncio.Task[None] | None = None  # Manager.spawn's start task, while it runs
        self.detached = False  # set when the daemon lets go of the VM without stopping it
        self.caller_unit: str | None = None  # --keep-unit: the unit of the client that spawned it
        self.clone_of: CloneSource | None = None  # a clone: the snapshot bundle its state comes from
        self._notify_listener: NotifyListener | None = None
        self._ready_pending = False
        self._control: ControlServer | None = None
        self._tasks = TaskOwner(f"machine {record.name}")
        self.monitor = QemuMonitor(
            record.name,
            self.paths.qmp,
            self._on_qmp_event,
            self._on_monitor_notice,
            self._wait_exit,
            lambda: self._qemu is not None and not self._qemu.exited and self.record.state.is_active,
            self._tasks,
        )
        # Raw QMP events for io.systemd.MachineInstance.SubscribeEvents; a slow reader loses events.
        self.qmp_events: FanOut[QmpEvent] = FanOut(maxsize=1024)

    def _leader_pid(self) -> int:
        """The process machined knows the VM by: the reaper (reaper.py), else QEMU."""
        assert self._qemu is not None
        return self._qemu.reaper.pid if self._qemu.reaper is not None else self._qemu.pid

    def _reaper_pids(self) -> list[int]:
        return [self._qemu.reaper.pid] if self._qemu is not None and self._qemu.reaper is not None else []

    @property
    def name(self) -> str:
        return self.record.name

    # --- state ----------------------------------------------------------------------
    def _enter(self, state: MachineState) -> None:
        self.record.enter(state)
        self._persist()
        self._notify()

    def _persist(self) -> None:
        try:
            content = json_bytes({"version": STATE_FORMAT_VERSION, "machine": self.record.to_json()})
            state_seal.seal(self.directory, content)  # a confined VM's directory is not ours alone
            replace_private_file(self.paths.state, content)
        except OSError:
            # Losing state.json costs re-adoption after a restart, not the running VM.
            _log.exception("%s: could not write state.json", self.name)

    def _notify(self) -> None:
        rec = self.record
        self._on_event(self, "StateChanged", {"state": rec.state.value, "ready": rec.ready, "reason": rec.reason})
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Wake every `wait_for` to check its predicate again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, operation: str) -> None:
        """Wait until `predicate()` holds; Timeout naming `operation` after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise Timeout(operation) from None

    # --- start ------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring the VM to RUNNING (and READY), or unwind everything and raise StartFailed."""
        step = "runtime-directory"
        try:
            async with contextlib.AsyncExitStack() as stack:
                make_private_dir(self.directory)
                stack.callback(shutil.rmtree, self.directory, ignore_errors=True)
                identity = self._take_identity()
                stack.callback(state_seal.remove_seal, self.directory)
                self.record.runtime_directory = str(self.directory)
                self._persist()
                self._notify()  # events show the VM from its first state, "starting"

                step = "resolve"
                host = resolve_host(
                    self.spec, self.name, self.record.id, self.paths, identity, frozen_image=self.clone_of is not None
                )
                # The fds opened for QEMU (vhost-vsock, TAP, files) are QEMU's once passed:
                # ours close after the spawn, or on any failure before it.
                qemu_fds = launch.FdsForQemu(host)
                stack.callback(qemu_fds.close)
                overlay_fds: tuple[int, ...] = ()
                if self.clone_of is not None:
                    await self.clone_of.prepare(self.paths)
                    if identity is not None:
                        overlay_fds = qemu_fds.add(self.clone_of.open_overlay(self.paths))

                step = "helpers"
                helpers = await start_helpers(
                    self.spec, self.name, self.directory, stack, vsock_cid=host.vsock_cid, identity=identity
                )
                self._helpers = helpers.processes
                self._helper_set = helpers
                self.record.helpers = {name: p.record for name, p in helpers.processes.items()}
                self.record.ssh_private_key_path = helpers.ssh_private_key_path

                step = "notify"
                notify_address = await self._open_notify_listener(stack, host.vsock_cid)

                step = "sockets"
                sockets = launch.bind_qemu_sockets(self.spec, self.paths, stack)
                console = sockets.get("console")
                channels = Channels(
                    qmp_fd=sockets["qmp"].fileno(),
                    console_fd=console.fileno() if console else None,
                    # QEMU logs every console byte there; the ConsoleHub rotates it (History).
                    console_log=str(self.paths.console_log),
                    payload_dir=str(launch.make_payload_dir(self.paths)),
                    notify_address=notify_address,
                    display_socket=launch.display_socket(self.spec, self.paths, self.settings.gui_window),
                )
                resources = assemble(self.name, host, helpers.resources, channels, confined=identity is not None)
                if identity is not None:
                    resources = launch.as_seen_from_vm_dir(resources, self.directory)
                command = self._clone_command(build_qemu_command(self.spec, resources), overlay_fds)
                for path, content in command.files.items():
                    write_private_file(self.directory / path, content)  # payload paths may be relative to it
                if identity is not None:
                    launch.hand_over_channels(self.paths, command, identity)

                step = "qemu"
                # Secrets travel in payload files (path=), never in the argv: safe to log, and
                # the first thing to look at when QEMU refuses to start (docs/vmspawnd.md).
                _log.debug("%s: %s", self.name, shlex.join(command.argv))
                self._qemu = await spawn_reaped(
                    "qemu",
                    launch.confine(command.argv, identity, resources.kvm),
                    pass_fds=command.pass_fds,
                    log_path=self.paths.qemu_log,
                    status_path=self.paths.exit_status,
                    leader_options=launch.leader_options(self.spec, self.paths, DEFAULT_POWEROFF_DEADLINE),
                    cwd=self.directory,  # a confined QEMU names its own files relative to it
                )
                stack.push_async_callback(self._kill_qemu)
                for sock in sockets.values():
                    sock.close()  # QEMU holds them now; we reconnect by path
                qemu_fds.close()
                self.record.qemu = self._qemu.record
                if self._qemu.reaper is not None:
                    self.record.reaper = self._qemu.reaper.record
                self.record.qmp_address = str(self.paths.qmp)
                if console:
                    self.record.console_address = str(self.paths.console)
                    self.record.console_log = str(self.paths.console_log)
                self.record.display_address = channels.display_socket or ""
                self._persist()

                step = "qmp"
                await self._unless_qemu_exits(self.monitor.connect(), step)
                stack.push_async_callback(self.monitor.close)

                step = "control"
                self._control = await self.settings.serve_control(self, self.paths.control)
                stack.push_async_callback(self._close_control)
                self.record.control_address = str(self.paths.control)

                if console:
                    # Before `cont`: the hub sees the guest's first byte (QEMU drops output
                    # while no client is connected).
                    step = "console"
                    hub = ConsoleHub(self.name, self.paths.console, self.paths.console_log)
                    await self._unless_qemu_exits(hub.connect(), step)
                    self.console = hub
                    stack.push_async_callback(hub.close, False)

                # Before `cont`: the guest's first instruction already runs in the VM's unit,
                # and a VM that cannot be placed or registered never ran.
                step = "register"
                self._registration = await register_machine(
                    info_for(self.record, self.spec, self._leader_pid(), vsock_cid=host.vsock_cid),
                    register=self.spec.register,
                    keep_unit=self.spec.keep_unit,
                    caller_unit=self.caller_unit,
                    slice_name=self.spec.slice,
                    properties=self.spec.properties,
                    pids=process_tree([*self._reaper_pids(), self._qemu.pid, *(p.pid for p in self._helpers.values())]),
                    on_request_stop=self.terminate,
                    machined_connection=self._qemu.machined_connection,
                )
                self._qemu.machined_connection = None  # registration closed it
                stack.push_async_callback(self._registration.close)
                self.record.unit = self._registration.unit or ""
                self.record.registered = self._registration.registered

                if self.clone_of is not None:
                    step = "restore"
                    await self._unless_qemu_exits(self.clone_of.load(self.monitor, self.subscribe_qmp), step)

                step = "cont"
                await self._unless_qemu_exits(self.monitor.execute("cont"), step)
                step = "hotplug"
                for device in command.hotplug:  # a clone's network card: the guest runs again
                    await self._unless_qemu_exits(self.monitor.execute("device_add", device), step)

                self._supervisor = self._tasks.spawn(self._supervise(), "supervise")
                stack.pop_all()
        except (InvalidSpec, StartFailed, SnapshotIncompatible):
            raise  # the client's mistake, or already named with its step
        except Exception as exc:
            raise StartFailed(step, _describe_failure(exc), self._stderr_tail()) from exc
        self._enter(MachineState.RUNNING)
        if self._notify_listener is None or not self.spec.notify_ready or self._ready_pending:
            self._set_ready()

    def _take_identity(self) -> VmIdentity | None:
        """The uid=gid the VM's QEMU and swtpm run as (system instance), recorded as the
        owner of the VM's directory: lowest free id, no await between the pick and the chown,
        so two starts never pick the same (host/identity.py)."""
        ids = self.settings.vm_ids
        if ids is None:
            return None
        try:
            identity = pick_identity(ids, ids_in_use(self.directory.parent, ids))
        except LookupError as exc:
            raise StartFailed("runtime-directory", str(exc)) from None
        hand_over(self.directory, identity)
        return identity

    def _clone_command(self, command: QemuCommand, overlay_fds: tuple[int, ...]) -> QemuCommand:
        """A clone's command reads its state and disk from the bundle (snapshot.CloneSource)."""
        if self.clone_of is None:
            return command
        return self.clone_of.adapt(command, self.paths, self.spec.discard_disk, overlay_fds)

    # --- readiness and the guest's notify channel ------------------------------------------
    async def _open_notify_listener(self, stack: contextlib.AsyncExitStack, vsock_cid: int | None) -> str | None:
        """Listen for the guest's READY/STATUS/EXIT_STATUS if anything can reach us; the
        vsock address the guest is given (launch.open_notify_listener)."""
        listener, self.record.readiness = await launch.open_notify_listener(
            self.settings.notify_transport, self.paths, vsock_cid, self.spec.notify_ready, self._on_notify, self.name
        )
        if listener is None:
            return None
        self._notify_listener = listener
        stack.push_async_callback(listener.close)
        self.record.notify_address = listener.address
        return listener.address if listener.address.startswith("vsock") else None

    def _on_notify(self, fields: dict[str, str]) -> None:
        """Handle one message as vmspawn does: READY=1, STATUS=, EXIT_STATUS= (uint8)."""
        rec = self.record
        if "STATUS" in fields:
            rec.status_text = fields["STATUS"]
        if "EXIT_STATUS" in fields:
            status = parse_exit_status(fields["EXIT_STATUS"])
            if status is None:
                _log.warning("%s: ignoring invalid EXIT_STATUS=%r", self.name, fields["EXIT_STATUS"])
            else:
                rec.exit_status = status
        self._persist()
        self._on_event(self, "Notify", dict(fields))
        if fields.get("READY") == "1" and self.spec.notify_ready:
            if rec.state is MachineState.STARTING:
                self._ready_pending = True
            elif rec.state is MachineState.RUNNING:
                self._set_ready()
        else:
            self._wake_waiters()

    def _set_ready(self) -> None:
        self.record.ready = True
        self._enter(MachineState.READY)

    # --- QMP for the per-VM control interface --------------------------------------------------
    async def qmp_execute(self, command: str) -> object:
        """One bounded QMP command on behalf of a client (Timeout / NotConnected otherwise)."""
        if self.record.state.is_final:
            raise NotConnected(self.name)
        return await self.monitor.request(command, self.record.state.value, command)

    def subscribe_qmp(self) -> contextlib.AbstractContextManager[asyncio.Queue[QmpEvent]]:
        """Raw QMP events of this VM while the block runs; (None, None) marks its end."""
        return self.qmp_events.subscribe()

    async def _close_control(self) -> None:
        self.qmp_events.publish((None, None))  # SubscribeEvents streams end with NotConnected
        if self._control is not None:
            # Calls in flight get their replies before their connection closes, as
            # systemd-vmspawn answers Terminate before it exits. The drain is not waited
            # for: Terminate is such a call, and it waits for this teardown to finish. The
            # bound covers the rest of the teardown (helpers' stop grace, machined) that
            # Terminate waits for.
            self._control.close(drain_timeout=60.0)
            self._control = None
        try:
            self.paths.control.unlink(missing_ok=True)
        except OSError as exc:
            _log.error("%s: could not remove the control socket: %s", self.name, exc.strerror)

    async def _kill_qemu(self) -> None:
        if self._qemu is not None and self._qemu.machined_connection is not None:
            self._qemu.machined_connection.close()  # the start failed before registering
            self._qemu.machined_connection = None
        if self._qemu is not None and not self._qemu.exited:
            self._qemu.send_signal(signal.SIGKILL)
        if self._qemu is not None:
            await self._qemu.wait()

    def _stderr_tail(self) -> str:
        return launch.stderr_tail(self.paths)

    async def _unless_qemu_exits(self, awaitable: Awaitable[T], step: str) -> T:
        assert self._qemu is not None
        return await launch.unless_exits(self._qemu, awaitable, step, self.paths, self._stop_reason)

    def _on_qmp_event(self, name: str, data: dict[str, object]) -> None:
        """QMP events go to subscribers as they are; a guest reset is not a stop."""
        _log.debug("%s: QMP event %s %s", self.name, name, data)
        if name in ("STOP", "RESUME"):
            self._set_paused(name == "STOP")
        elif name == "SHUTDOWN" and isinstance(data.get("reason"), str):
            self._shutdown_cause = str(data["reason"])
        self.qmp_events.publish((name, data))
        self._on_event(self, name, data)

    def _on_monitor_notice(self, name: str, data: dict[str, object]) -> None:
        if name == "QmpReconnected":
            self._set_paused(data.get("status") == "paused")
        self._on_event(self, name, data)

    def _set_paused(self, paused: bool) -> None:
        if paused != self.record.paused:
            self.record.paused = paused
            self._persist()

    # --- adoption after a daemon restart ----------------------------------------------------
    async def adopt(self) -> bool:
        """Take over a VM an earlier daemon started (adoption.py); False: forget it."""
        return await adoption.adopt(self)

    # --- supervision ---------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Wait for QEMU to exit; a helper dying first ends the VM, as in systemd-vmspawn."""
        assert self._qemu is not None
        waiters = {asyncio.ensure_future(self._qemu.wait()): "qemu"}
        for name, helper in self._helpers.items():
            waiters[asyncio.ensure_future(helper.wait())] = name
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        ended = {waiters[w] for w in done}
        first = "qemu" if "qemu" in ended else next(iter(ended))
        # swtpm exits on the shutdown command QEMU sends while it exits itself: a helper that
        # ends while QEMU is ending is part of QEMU's exit, not a helper failure.
        if first != "qemu" and not self._qemu.exited and not await self._wait_exit(HELPER_EXIT_GRACE):
            status = self._helpers[first].returncode
            self._stop_reason = self._stop_reason or f"helper {first} exited ({describe_status(status)})"
            _log.warning("%s: %s, terminating the VM", self.name, self._stop_reason)
            self._helper_failed = True
            await self._qemu.terminate(TERM_GRACE)
        for waiter in waiters:
            waiter.cancel()
        returncode = await self._qemu.wait()
        try:
            await self._finish(returncode)
        except Exception:
            # _finish guards each step; this is the last line: the VM has ended, record
            # it and never leave callers waiting on a VM whose QEMU is gone.
            _log.exception("%s: recording the end of the VM failed", self.name)
            if not self.record.state.is_final:
                self.record.reason = self.record.reason or describe_exit(returncode)
                self.record.enter(MachineState.FAILED)
                self._persist()
                self._notify()
            self._finished.set()

    async def _finish(self, returncode: int | None) -> None:
        """Record why QEMU ended, release everything the VM held, enter the final state.

        Each release step is independent: one that fails is logged and the others still
        run, and the VM always reaches its final state (its name is then free to reuse).
        """
        rec = self.record
        rec.stderr_tail = self._stderr_tail()
        if returncode is not None and returncode >= 0:
            rec.exit_code = returncode
        elif returncode is not None:
            rec.exit_signal = -returncode
        outcome = decide_outcome(
            ExitFacts(
                returncode=returncode,
                stop_reason=self._stop_reason,
                helper_failed=self._helper_failed,
                requested_signal=self._requested_signal,
                host_signal=parse_host_signal(rec.stderr_tail, rec.reaper.pid if rec.reaper is not None else None),
                shutdown_cause=self._shutdown_cause,
            )
        )
        rec.reason = outcome.reason
        for step, release in self._release_steps():
            try:
                await release()
            except Exception:
                _log.exception("%s: %s failed after QEMU's exit", self.name, step)
        rec.ssh_private_key_path = ""
        rec.ready = False
        rec.qmp_address = rec.console_address = rec.control_address = rec.notify_address = ""  # gone with QEMU
        rec.display_address = ""
        self._enter(outcome.state)
        self._finished.set()
        _log.info("%s: %s (%s)", self.name, outcome.state.value, rec.reason)

    def _release_steps(self) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
        """What a VM holds once QEMU is gone, in the order it is let go."""

        async def close_console() -> None:
            if self.console is not None:
                await self.console.close(drain=True)

        async def close_notify() -> None:
            if self._notify_listener is not None:
                listener, self._notify_listener = self._notify_listener, None
                await listener.close()

        async def stop_helpers() -> None:
            rec = self.record
            if self._helper_set is not None:
                await self._helper_set.aclose()  # helpers stop (reaped) and keys/sockets go with the VM
            elif rec.helpers:  # adopted after a restart: known only from the record
                await stop_recorded_helpers(rec.helpers, self.name, self.directory, rec.ssh_private_key_path)

        async def unregister() -> None:
            if self._registration is not None:
                await self._registration.close()  # unregister, end the scope; failures are only logged

        async def remove_leftovers() -> None:
            remove_transient_files(self.paths, self.name)  # credentials (keys) end with the VM, as vmspawn's SMBIOS dir

        return [
            ("closing the console", close_console),
            ("closing QMP", self.monitor.close),
            ("closing the control socket", self._close_control),
            ("closing the notify socket", close_notify),
            ("stopping the helpers", stop_helpers),
            ("unregistering", unregister),
            ("removing runtime files", remove_leftovers),
        ]

    # --- lifecycle requests ------------------------------------------------------------------
    def _require(self, operation: str, *states: MachineState) -> None:
        if self.record.state not in states:
            raise InvalidState(self.name, self.record.state.value, operation)

    async def power_off(self, deadline: float = DEFAULT_POWEROFF_DEADLINE) -> None:
        """ACPI power button, then wait for the VM's end (escalating after `deadline`)."""
        if self.record.state is not MachineState.STOPPING:
            await self.request_power_off(deadline)
        await self._finished.wait()

    async def request_power_off(self, deadline: float = DEFAULT_POWEROFF_DEADLINE) -> None:
        """Press the ACPI power button and return; if the guest has not powered off by
        `deadline`, the machine escalates (QMP quit, SIGTERM, SIGKILL) on its own.

        A QEMU that does not take the power-button command is escalated on at once, as a
        VM that must stop. Asking again while it is stopping changes nothing.
        """
        if self.record.state is MachineState.STOPPING:
            return
        self._require("power off", MachineState.RUNNING, MachineState.READY)
        try:
            await self.monitor.execute("system_powerdown")
        except (NotConnected, QmpError, Timeout) as exc:
            _log.warning("%s: ACPI power-off request failed (%s), escalating", self.name, exc)
            deadline = 0
        self._stop_reason = "powered off on request"
        self.record.reason = self._stop_reason  # persisted: a restarted daemon finishes the stop
        self._enter(MachineState.STOPPING)
        self._tasks.spawn(self._escalate_after(deadline), "escalate after the power-off deadline")

    async def _escalate_after(self, deadline: float) -> None:
        if not await self._wait_finished(deadline):
            self._stop_reason = f"terminated: the guest did not power off within {deadline:g}s"
            await self._escalate()

    async def terminate(self) -> None:
        """Stop QEMU now (QMP quit, then signals), as vmspawn's Terminate."""
        if self._qemu is None or self.record.state.is_final:
            raise InvalidState(self.name, self.record.state.value, "terminate")
        self._stop_reason = self._stop_reason or "terminated on request"
        if self.record.state is not MachineState.STOPPING and self.record.state is not MachineState.STARTING:
            self.record.reason = self._stop_reason
            self._enter(MachineState.STOPPING)
        await self._escalate()

    def kill(self, signo: int) -> None:
        """Send a signal to QEMU (like machinectl kill); the supervisor records the outcome."""
        if self._qemu is None or self.record.state.is_final:
            raise InvalidState(self.name, self.record.state.value, "kill")
        self._requested_signal = signo
        self._qemu.send_signal(signo)

    async def _escalate(self) -> None:
        assert self._qemu is not None
        if self.monitor.connected:
            with contextlib.suppress(Timeout, NotConnected, QmpError):
                await self.monitor.execute("quit", timeout=QUIT_GRACE)
            if await self._wait_exit(QUIT_GRACE):
                await self._wait_finished(None)
                return
        await self._qemu.terminate(TERM_GRACE)
        await self._wait_finished(None)

    async def _wait_exit(self, timeout: float) -> bool:
        assert self._qemu is not None
        try:
            async with asyncio.timeout(timeout):
                await self._qemu.wait()
            return True
        except TimeoutError:
            return False

    async def _wait_finished(self, timeout: float | None) -> bool:
        """Wait for the supervisor to record the end (or for start to unwind)."""
        if self._supervisor is None:
            # Still starting: the start path owns the process and will unwind.
            if self._qemu is not None:
                return await self._wait_exit(timeout if timeout is not None else 3600)
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._finished.wait()
            return True
        except TimeoutError:
            return False

    async def _qmp_command(self, operation: str, command: str) -> None:
        self._require(operation, MachineState.RUNNING, MachineState.READY)
        await self.monitor.request(operation, self.record.state.value, command)

    async def pause(self) -> None:
        """Freeze the vCPUs (QMP stop); the STOP event updates `paused`."""
        await self._qmp_command("pause", "stop")
        self._set_paused(True)  # the STOP event may be pumped after the reply

    async def resume(self) -> None:
        await self._qmp_command("resume", "cont")
        self._set_paused(False)

    async def reboot(self) -> None:
        """Hard reset (QMP system_reset), as vmspawn's Reboot; the VM keeps running."""
        await self._qmp_command("reboot", "system_reset")

    async def screenshot(self, image_format: str) -> int:
        """The guest's display as QEMU renders it (QMP screendump), as an open fd.

        QEMU writes the image into the VM's private directory; the daemon opens it and
        unlinks it at once, so the caller gets the bytes and nothing stays behind.
        """
        self._require("take a screenshot of", MachineState.RUNNING, MachineState.READY)
        if self.spec.console != ConsoleMode.GUI:
            raise NotSupported(
                f"screenshots of a VM without a display (its console mode is {self.spec.console}; use --console=gui)"
            )
        path = self.directory / f".screenshot-{secrets.token_hex(4)}.{image_format}"
        try:
            await self.monitor.request(
                "take a screenshot",
                self.record.state.value,
                "screendump",
                # Relative to QEMU's working directory, the VM's: a confined QEMU cannot
                # search machines/ above it. QEMU writes the file as its own user.
                {"filename": path.name, "format": image_format},
            )
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        finally:
            path.unlink(missing_ok=True)

    async def query_status(self) -> dict[str, object]:
        """QEMU's own view (running flag and status string), bounded like every QMP call."""
        return await self.monitor.query_status()

    async def wait_ready(self, timeout: float) -> None:
        rec = self.record
        await self.wait_for(lambda: rec.ready or rec.state.is_final, timeout, f"waiting for {self.name} to be ready")
        if not rec.ready:
            raise InvalidState(self.name, rec.state.value, "wait for readiness")

    def remove_files(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        state_seal.remove_seal(self.directory)

    async def detach(self) -> None:
        """Daemon exit without stopping the VM: let go of QMP and the process watch."""
        self.detached = True
        if self.console is not None:
            await self.console.close(drain=False)
        await self._tasks.aclose()  # the supervisor, and escalations a restarted daemon resumes
        await self.monitor.close()
        if self._qemu is not None:
            self._qemu.close()
