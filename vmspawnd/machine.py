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
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path

from vmspawnd.control import ControlServer
from vmspawnd.errors import InvalidSpec, InvalidState, NotConnected, NotSupported, StartFailed, Timeout, VmspawnError
from vmspawnd.helpers import HelperSet, start_helpers, stop_recorded_helpers
from vmspawnd.host.process import ChildProcess, ReapedProcess, children_of, is_same_process, process_tree, read_tail, spawn_reaped
from vmspawnd.host.registration import Registration, info_for, machined_address, register_machine, scope_unit_name
from vmspawnd.model import STATE_FORMAT_VERSION, MachineRecord, MachineState, ProcessRecord
from vmspawnd.outcome import ExitFacts, decide_outcome, describe_exit, describe_status, parse_host_signal
from vmspawnd.qemu import resolve
from vmspawnd.qemu.command import Resources, build_qemu_command
from vmspawnd.qemu.console import ConsoleHub, History
from vmspawnd.qemu.guest_notify import NotifyListener, open_unix_listener, open_vsock_listener, parse_exit_status, reopen_listener
from vmspawnd.qemu.qmp import QmpError, QmpSession
from vmspawnd.runtime_dir import bind_listening_socket, make_private_dir, read_json, write_json_atomic, write_private_file
from vmspawnd.settings import Settings
from vmspawnd.spec import ConsoleMode, VmSpec
from vmspawnd.spec.discovery import native_arch

_log = logging.getLogger(__name__)

QUIT_GRACE = 3.0
QMP_EXIT_GRACE = 1.0  # after QMP drops: is QEMU exiting (normal) or did only the connection die?
TERM_GRACE = 5.0
HELPER_EXIT_GRACE = 2.0  # how long QEMU may take to follow a helper that ended with it
DEFAULT_POWEROFF_DEADLINE = 60.0

EventCallback = Callable[["Machine", str, dict[str, object]], None]


class Machine:
    """A VM and everything the daemon holds for it."""

    def __init__(
        self, record: MachineRecord, spec: VmSpec, directory: Path, on_event: EventCallback, settings: Settings
    ) -> None:
        self.settings = settings
        self.record = record
        self.spec = spec
        self.directory = directory
        self._on_event = on_event
        self._qemu: ReapedProcess | None = None
        self._helpers: dict[str, ChildProcess] = {}
        self._helper_set: HelperSet | None = None  # stopped by _finish once QEMU is gone
        self._qmp: QmpSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._changed = asyncio.Condition()
        self._stop_reason: str | None = None
        self._requested_signal: int | None = None
        self._shutdown_cause: str | None = None  # the reason of QEMU's SHUTDOWN event
        self._helper_failed = False
        self._registration: Registration | None = None  # machined and the scope unit, undone in _finish
        self.console: ConsoleHub | None = None  # the daemon's console connection and history
        self.starting: asyncio.Task[None] | None = None  # Manager.spawn's start task, while it runs
        self.detached = False  # set when the daemon lets go of the VM without stopping it
        self.caller_unit: str | None = None  # --keep-unit: the unit of the client that spawned it
        self._notify_listener: NotifyListener | None = None
        self._ready_pending = False
        self._control: ControlServer | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._qmp_subscribers: set[asyncio.Queue[tuple[str | None, dict[str, object] | None]]] = set()

    # --- paths --------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.directory / "qmp"

    @property
    def console_path(self) -> Path:
        return self.directory / "console"

    @property
    def console_log_path(self) -> Path:
        return self.directory / "console.log"

    @property
    def display_path(self) -> Path:
        """--console=gui without a session to open a window in: QEMU's VNC socket."""
        return self.directory / "display"

    @property
    def qemu_log_path(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def exit_status_path(self) -> Path:
        """Written by the reaper when QEMU exits: survives a daemon restart."""
        return self.directory / "qemu.exit"

    @property
    def control_path(self) -> Path:
        """io.systemd.MachineInstance of this VM (machinectl 261+ and the leader call it)."""
        return self.directory / "control"

    def _leader_options(self) -> list[str]:
        """How the reaper, registered as the VM's leader, reaches us or QEMU, and where it
        connects to machined for the registration (reaper.py)."""
        options = [f"--control={self.control_path}", f"--qmp={self.qmp_path}", f"--deadline={DEFAULT_POWEROFF_DEADLINE:g}"]
        if self.spec.register is not False:
            options.append(f"--machined={machined_address(os.environ, os.geteuid() == 0)}")
        return options

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
            write_json_atomic(self.directory / "state.json", {"version": STATE_FORMAT_VERSION, "machine": self.record.to_json()})
        except OSError:
            # Losing state.json costs re-adoption after a restart, not the running VM.
            _log.exception("%s: could not write state.json", self.name)

    def _notify(self) -> None:
        rec = self.record
        self._on_event(self, "StateChanged", {"state": rec.state.value, "ready": rec.ready, "reason": rec.reason})

        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, operation: str) -> None:
        """Wait until `predicate()` holds; Timeout naming `operation` after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(predicate)
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
                self.record.runtime_directory = str(self.directory)
                self._persist()

                step = "resolve"
                resources = self._resolve()
                # The vhost-vsock fd is QEMU's once passed: ours closes after the spawn, or
                # on any failure before it (FileIO.close is idempotent).
                vhost_vsock = None if resources.vhost_vsock_fd is None else os.fdopen(resources.vhost_vsock_fd, "rb", buffering=0)
                if vhost_vsock is not None:
                    stack.callback(vhost_vsock.close)

                step = "helpers"
                helpers = await start_helpers(
                    self.spec, self.name, self.directory, stack, vsock_cid=resources.vsock_cid
                )
                self._helpers = helpers.processes
                self._helper_set = helpers
                self.record.helpers = {name: p.record for name, p in helpers.processes.items()}
                self.record.ssh_private_key_path = helpers.ssh_private_key_path

                step = "notify"
                notify_address = await self._open_notify_listener(stack, resources)

                step = "sockets"
                sockets = self._bind_sockets(stack)
                console = sockets.get("console")
                resources = dataclasses.replace(
                    resources,
                    qmp_fd=sockets["qmp"].fileno(),
                    console_fd=console.fileno() if console else None,
                    payload_dir=str(self._make_payload_dir()),
                    notify_address=notify_address,
                    **helpers.resources,  # type: ignore[arg-type]
                )
                command = build_qemu_command(self.spec, resources)
                for path, content in command.files.items():
                    write_private_file(Path(path), content)

                step = "qemu"
                self._qemu = await spawn_reaped(
                    "qemu", command.argv, pass_fds=command.pass_fds, log_path=self.qemu_log_path,
                    status_path=self.exit_status_path, leader_options=self._leader_options(),
                )
                stack.push_async_callback(self._kill_qemu)
                for sock in sockets.values():
                    sock.close()  # QEMU holds them now; we reconnect by path
                if vhost_vsock is not None:
                    vhost_vsock.close()
                self.record.qemu = self._qemu.record
                if self._qemu.reaper is not None:
                    self.record.reaper = self._qemu.reaper.record
                self.record.qmp_address = str(self.qmp_path)
                if console:
                    self.record.console_address = str(self.console_path)
                    self.record.console_log = str(self.console_log_path)
                self.record.display_address = resources.display_socket or ""
                self._persist()

                step = "qmp"
                self._qmp = QmpSession(self.name, self._on_qmp_event, self._on_qmp_disconnect)
                await self._unless_qemu_exits(self._qmp.connect(str(self.qmp_path)), step)
                stack.push_async_callback(self._qmp.close)

                step = "control"
                self._control = await self.settings.serve_control(self, self.control_path)
                stack.push_async_callback(self._close_control)
                self.record.control_address = str(self.control_path)

                if console:
                    # Before `cont`: the hub sees the guest's first byte (QEMU drops output
                    # while no client is connected).
                    step = "console"
                    hub = ConsoleHub(self.name, self.console_path, self.console_log_path)
                    await self._unless_qemu_exits(hub.connect(), step)
                    self.console = hub
                    stack.push_async_callback(hub.close, False)

                # Before `cont`: the guest's first instruction already runs in the VM's unit,
                # and a VM that cannot be placed or registered never ran.
                step = "register"
                self._registration = await register_machine(
                    info_for(self.record, self.spec, self._leader_pid(), vsock_cid=resources.vsock_cid),
                    register=self.spec.register, keep_unit=self.spec.keep_unit, caller_unit=self.caller_unit,
                    slice_name=self.spec.slice, properties=self.spec.properties,
                    pids=process_tree([*self._reaper_pids(), self._qemu.pid, *(p.pid for p in self._helpers.values())]),
                    on_request_stop=self.terminate, machined_connection=self._qemu.machined_connection,
                )
                self._qemu.machined_connection = None  # registration closed it
                stack.push_async_callback(self._registration.close)
                self.record.unit = self._registration.unit or ""
                self.record.registered = self._registration.registered

                step = "cont"
                await self._unless_qemu_exits(self._qmp.execute("cont"), step)

                self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")
                stack.pop_all()
        except InvalidSpec:
            raise
        except StartFailed:
            raise
        except VmspawnError as exc:
            raise StartFailed(step, str(exc), self._stderr_tail()) from exc
        except OSError as exc:
            raise StartFailed(step, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), self._stderr_tail()) from exc
        except QmpError as exc:
            raise StartFailed(step, str(exc), self._stderr_tail()) from exc
        self._enter(MachineState.RUNNING)
        if self._notify_listener is None or not self.spec.notify_ready or self._ready_pending:
            self._set_ready()

    # --- readiness and the guest's notify channel ------------------------------------------
    async def _open_notify_listener(self, stack: contextlib.AsyncExitStack, resources: Resources) -> str | None:
        """Listen for the guest's READY/STATUS/EXIT_STATUS, if anything can reach us.

        With vsock the guest gets the address as the vmm.notify_socket credential. Without
        it nothing in the guest can report readiness, so running counts as ready (vmspawn
        never signals READY there at all: a documented deviation).
        """
        rec = self.record
        if self.settings.notify_transport == "unix":
            sock, address = open_unix_listener(self.directory / "notify")
        elif resources.vsock_cid is not None:
            sock, address = open_vsock_listener()
        else:
            rec.readiness = "running (no vsock: the guest cannot report readiness)"
            return None
        self._notify_listener = NotifyListener(sock, address, self._on_notify, self.name)
        await self._notify_listener.start()
        stack.push_async_callback(self._notify_listener.close)
        rec.notify_address = address
        rec.readiness = "guest (READY=1 over the notify socket)" if self.spec.notify_ready else "running (--notify-ready=no)"
        return address if address.startswith("vsock") else None

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
            self._notify_waiters()

    def _set_ready(self) -> None:
        self.record.ready = True
        self._enter(MachineState.READY)

    def _notify_waiters(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    # --- QMP for the per-VM control interface --------------------------------------------------
    async def qmp_execute(self, command: str) -> object:
        """One bounded QMP command on behalf of a client (Timeout / NotConnected otherwise)."""
        if self._qmp is None or not self._qmp.connected or self.record.state.is_final:
            raise NotConnected(self.name)
        try:
            return await self._qmp.execute(command)
        except QmpError as exc:
            raise InvalidState(self.name, self.record.state.value, f"{command} ({exc})") from exc

    @contextlib.contextmanager
    def subscribe_qmp(self) -> Iterator[asyncio.Queue[tuple[str | None, dict[str, object] | None]]]:
        """Raw QMP events of this VM; (None, None) marks the end of the VM."""
        queue: asyncio.Queue[tuple[str | None, dict[str, object] | None]] = asyncio.Queue(maxsize=1024)
        self._qmp_subscribers.add(queue)
        try:
            yield queue
        finally:
            self._qmp_subscribers.discard(queue)

    async def _close_control(self) -> None:
        for queue in self._qmp_subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((None, None))  # SubscribeEvents streams end with NotConnected
        if self._control is not None:
            # Calls in flight get their replies before their connection closes, as
            # systemd-vmspawn answers Terminate before it exits. The drain is not waited
            # for: Terminate is such a call, and it waits for this teardown to finish. The
            # bound covers the rest of the teardown (helpers' stop grace, machined) that
            # Terminate waits for.
            self._control.close(drain_timeout=60.0)
            self._control = None
        try:
            (self.directory / "control").unlink(missing_ok=True)
        except OSError as exc:
            _log.error("%s: could not remove the control socket: %s", self.name, exc.strerror)

    def _resolve(self) -> Resources:
        from vmspawnd.qemu import vsock

        resolve.check_spec_paths(self.spec)
        arch = native_arch()
        if self.spec.grow_image is not None and self.spec.image:
            resolve.grow_image(self.spec.image, self.spec.grow_image)
        initrd = None
        if self.spec.initrds:
            initrd = resolve.merge_initrds(list(self.spec.initrds), self.directory / "initrd")
        firmware = resolve.load_firmware(arch, self.spec.firmware, self.spec.secure_boot, self.directory / "efi-vars.fd")
        qemu_binary = resolve.find_qemu_binary(arch)
        kvm = resolve.decide_kvm(self.spec.kvm)
        block_devices = resolve.block_devices(list(self.spec.extra_drives))
        host_machine_id = resolve.host_machine_id()
        # Last: nothing may fail after the vhost-vsock fd is open (start() closes it).
        vsock_fd = vsock_cid = None
        try:
            vsock_fd = vsock.open_vhost_vsock(self.spec.vsock)
            if vsock_fd is not None:
                vsock_cid = vsock.assign_cid(vsock_fd, self.name, self.spec.vsock_cid)
        except OSError as exc:
            if vsock_fd is not None:
                os.close(vsock_fd)
            raise StartFailed("resolve", f"vsock: {exc.strerror or exc}") from None
        return Resources(
            name=self.name,
            host_machine_id=host_machine_id,
            vmgenid=resolve.derive_vmgenid(self.record.id),
            block_devices=block_devices,
            vsock_cid=vsock_cid,
            vhost_vsock_fd=vsock_fd,
            qemu_binary=qemu_binary,
            kvm=kvm,
            qmp_fd=-1,
            console_fd=None,
            # QEMU logs every console byte there; the ConsoleHub rotates it (History).
            console_log=str(self.console_log_path),
            display_socket=self._display_socket(),
            firmware=firmware,
            initrd=initrd,
            arch=arch,
        )

    def _display_socket(self) -> str | None:
        """--console=gui: a VNC socket, unless QEMU's window can open in the daemon's session."""
        if self.spec.console != ConsoleMode.GUI or self.settings.gui_window:
            return None
        return str(self.display_path)

    def _make_payload_dir(self) -> Path:
        """SMBIOS payloads (credentials may be secrets): 0600 files in a 0700 directory,
        passed to QEMU with path= so nothing secret shows in /proc/PID/cmdline."""
        payload = self.directory / "payload"
        make_private_dir(payload)
        return payload

    def _bind_sockets(self, stack: contextlib.AsyncExitStack) -> dict[str, socket.socket]:
        """Bind QEMU's sockets ourselves: no connect race, and reconnectable after a restart."""
        wanted = ["qmp"]
        if ConsoleMode(self.spec.console) not in (ConsoleMode.GUI, ConsoleMode.HEADLESS):
            wanted.append("console")
            History.create(self.console_log_path)
        sockets = {}
        for name in wanted:
            sock = bind_listening_socket(self.directory / name, 0o600)
            stack.callback(sock.close)
            sockets[name] = sock
        return sockets

    async def _unless_qemu_exits(self, awaitable: Awaitable[object], step: str) -> object:
        """Await a start step, but fail fast (with QEMU's stderr) if QEMU dies meanwhile."""
        assert self._qemu is not None
        work = asyncio.ensure_future(awaitable)
        exited = asyncio.ensure_future(self._qemu.wait())
        try:
            await asyncio.wait({work, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if work.done() and not work.cancelled() and work.exception() is None:
            return work.result()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
        # Either QEMU exited, or the step failed (most likely because QEMU is exiting).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._qemu.wait()
        if self._qemu.exited:
            reason = self._stop_reason or describe_exit(self._qemu.returncode)
            raise StartFailed(step, reason, self._stderr_tail())
        exc = work.exception()
        assert exc is not None
        raise exc

    async def _kill_qemu(self) -> None:
        if self._qemu is not None and self._qemu.machined_connection is not None:
            self._qemu.machined_connection.close()  # the start failed before registering
            self._qemu.machined_connection = None
        if self._qemu is not None and not self._qemu.exited:
            self._qemu.send_signal(signal.SIGKILL)
        if self._qemu is not None:
            await self._qemu.wait()

    def _stderr_tail(self) -> str:
        return read_tail(self.qemu_log_path, 2048)

    def _on_qmp_event(self, name: str, data: dict[str, object]) -> None:
        """QMP events go to subscribers as they are; a guest reset is not a stop."""
        _log.debug("%s: QMP event %s %s", self.name, name, data)
        if name in ("STOP", "RESUME"):
            self._set_paused(name == "STOP")
        elif name == "SHUTDOWN" and isinstance(data.get("reason"), str):
            self._shutdown_cause = str(data["reason"])
        for queue in self._qmp_subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((name, data))
        self._on_event(self, name, data)

    def _on_qmp_disconnect(self) -> None:
        """QMP dropped while we did not close it: if QEMU still runs, reconnect (QEMU's
        monitor socket takes a new client once the old one is gone), bounded."""
        if self._qemu is None or self._qemu.exited or not self.record.state.is_active:
            return
        self._own_task(self._reconnect_qmp())

    async def _reconnect_qmp(self) -> None:
        assert self._qemu is not None
        if await self._wait_exit(QMP_EXIT_GRACE):
            return  # QEMU was exiting: the supervisor records that
        _log.warning("%s: QMP connection lost while QEMU runs; reconnecting", self.name)
        self._on_event(self, "QmpDisconnected", {})
        if self._qmp is not None:
            await self._qmp.close()
        qmp = QmpSession(self.name, self._on_qmp_event, self._on_qmp_disconnect)
        try:
            await qmp.connect(str(self.qmp_path))
            status = await qmp.query_status()
        except (Timeout, NotConnected) as exc:
            _log.error("%s: QMP reconnect failed (%s); lifecycle calls will answer NotConnected", self.name, exc)
            await qmp.close()
            self._qmp = None
            return
        self._qmp = qmp
        self._set_paused(status.get("status") == "paused")
        self._on_event(self, "QmpReconnected", {"status": status.get("status")})
        _log.info("%s: QMP reconnected", self.name)

    def _set_paused(self, paused: bool) -> None:
        if paused != self.record.paused:
            self.record.paused = paused
            self._persist()

    # --- adoption after a daemon restart ----------------------------------------------------
    async def adopt(self) -> bool:
        """Take over a VM an earlier daemon started, reconciling like libvirt.

        Processes count as ours only if pid *and* start time (and boot) match. Mid-start →
        torn down (returns False: forget it); QEMU gone → recorded as ended, leftovers
        cleaned; shutdown in progress → finished; running → QMP, control socket, notify
        listener and console come back on the addresses the guest and clients know.
        Events emitted while no daemon listened are lost: state is re-queried instead.
        """
        rec = self.record
        if rec.state.is_final:
            self._finished.set()
            return True
        if rec.qemu is not None:
            self._qemu = ReapedProcess.adopt("qemu", rec.qemu, rec.reaper, self.exit_status_path)
        if rec.state is MachineState.STARTING:
            _log.warning("%s: was starting when the daemon stopped; tearing it down", self.name)
            if self._qemu is not None and not self._qemu.exited:
                self._qemu.send_signal(signal.SIGKILL)
                await self._qemu.wait()
            await stop_recorded_helpers(rec.helpers, self.name, self.directory, rec.ssh_private_key_path)
            self.remove_files()
            return False
        if rec.state is MachineState.STOPPING:
            self._stop_reason = rec.reason or "stopped on request"
        if self._qemu is None or self._qemu.exited:
            _log.info("%s: QEMU ended while the daemon was not running", self.name)
            await self._finish(await self._qemu.wait() if self._qemu is not None else None)
            return True
        self._helpers = {
            name: ChildProcess(name, record.pid, None) for name, record in rec.helpers.items() if is_same_process(record)
        }
        missing = [name for name in rec.helpers if name not in self._helpers]
        await self._reconnect()
        await self._renew_registration()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")
        if missing:
            self._stop_reason = f"helper {missing[0]} exited while vmspawnd was not running"
            self._helper_failed = True
            self._qemu.send_signal(signal.SIGTERM)
        elif rec.state is MachineState.STOPPING:
            _log.info("%s: finishing the shutdown that was in progress", self.name)
            self._own_task(self._escalate())
        _log.info("%s: adopted (QEMU pid %d)", self.name, self._qemu.pid)
        return True

    async def _renew_registration(self) -> None:
        """After a restart: register the VM with machined again if it was (machined drops a
        machine whose unit stopped, e.g. the caller's unit of a --keep-unit VM, and forgets
        everything when it restarts itself), and take its scope back, so that the VM's end
        releases them as a VM that never saw a restart would."""
        rec = self.record
        if not rec.registered and not rec.unit:
            return
        try:
            self._registration = await register_machine(
                info_for(rec, self.spec, self._leader_pid()), register=self.spec.register if rec.registered else False,
                keep_unit=self.spec.keep_unit, adopting=True,
            )
        except (StartFailed, OSError) as exc:
            _log.warning("%s: could not register the adopted VM again: %s", self.name, exc)
            return
        if rec.unit == scope_unit_name(self.name) and not self.spec.keep_unit:
            self._registration.scope_unit = rec.unit
        rec.registered = self._registration.registered

    async def _reconnect(self) -> None:
        """QMP (bounded), control socket, notify listener and console, as before the restart."""
        rec = self.record
        qmp = QmpSession(self.name, self._on_qmp_event, self._on_qmp_disconnect)
        try:
            await qmp.connect(str(self.qmp_path))
            self._qmp = qmp
            status = await qmp.query_status()
            rec.paused = status.get("status") == "paused"
        except (Timeout, NotConnected) as exc:
            _log.error("%s: QMP did not answer after the restart (%s); lifecycle calls will fail", self.name, exc)
            await qmp.close()
        if rec.control_address:
            self._control = await self.settings.serve_control(self, Path(rec.control_address))
        if rec.notify_address:
            sock, _address = reopen_listener(rec.notify_address, self.directory / "notify")
            self._notify_listener = NotifyListener(sock, rec.notify_address, self._on_notify, self.name)
            await self._notify_listener.start()
        if rec.console_address:
            hub = ConsoleHub(self.name, self.console_path, self.console_log_path)
            try:
                await hub.connect()
                self.console = hub
            except (OSError, TimeoutError, VmspawnError) as exc:
                _log.error("%s: console did not come back after the restart: %s", self.name, exc)
        self._persist()

    def _own_task(self, coroutine: Coroutine[object, object, object]) -> None:
        task = asyncio.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        outcome = decide_outcome(ExitFacts(
            returncode=returncode,
            stop_reason=self._stop_reason,
            helper_failed=self._helper_failed,
            requested_signal=self._requested_signal,
            host_signal=parse_host_signal(rec.stderr_tail, rec.reaper.pid if rec.reaper is not None else None),
            shutdown_cause=self._shutdown_cause,
        ))
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

        async def close_qmp() -> None:
            if self._qmp is not None:
                await self._qmp.close()

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
            self._remove_leftovers()  # credentials (keys) end with the VM, as vmspawn's SMBIOS dir

        return [
            ("closing the console", close_console),
            ("closing QMP", close_qmp),
            ("closing the control socket", self._close_control),
            ("closing the notify socket", close_notify),
            ("stopping the helpers", stop_helpers),
            ("unregistering", unregister),
            ("removing runtime files", remove_leftovers),
        ]

    def _remove_leftovers(self) -> None:
        """Sockets and temporary files die with QEMU; the record, logs and history stay.

        A failing filesystem (full, read-only, immutable) must not keep the VM from being
        recorded as ended: failures are logged, and Remove deletes the directory later.
        """
        for leftover in (self.qmp_path, self.console_path, self.display_path, self.directory / "notify", self.directory / "efi-vars.fd", self.directory / "initrd"):
            try:
                leftover.unlink(missing_ok=True)
            except OSError as exc:
                _log.error("%s: could not remove %s: %s", self.name, leftover, exc.strerror)
        # credentials (keys) end with the VM, as vmspawn's SMBIOS directory
        shutil.rmtree(self.directory / "payload", onerror=lambda _f, path, exc: _log.error("%s: could not remove %s: %s", self.name, path, exc[1]))

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
            if self._qmp is None:
                raise NotConnected(self.name)
            await self._qmp.execute("system_powerdown")
        except (NotConnected, QmpError, Timeout) as exc:
            _log.warning("%s: ACPI power-off request failed (%s), escalating", self.name, exc)
            deadline = 0
        self._stop_reason = "powered off on request"
        self.record.reason = self._stop_reason  # persisted: a restarted daemon finishes the stop
        self._enter(MachineState.STOPPING)
        self._own_task(self._escalate_after(deadline))

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
        if self._qmp is not None and self._qmp.connected:
            with contextlib.suppress(Timeout, NotConnected, QmpError):
                await self._qmp.execute("quit", timeout=QUIT_GRACE)
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
        if self._qmp is None or not self._qmp.connected:
            raise NotConnected(self.name)
        try:
            await self._qmp.execute(command)
        except QmpError as exc:
            raise InvalidState(self.name, self.record.state.value, f"{operation} ({exc})") from exc

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
            raise NotSupported(f"screenshots of a VM without a display (its console mode is {self.spec.console}; use --console=gui)")
        if self._qmp is None or not self._qmp.connected:
            raise NotConnected(self.name)
        path = self.directory / f".screenshot-{secrets.token_hex(4)}.{image_format}"
        try:
            await self._qmp.execute("screendump", {"filename": str(path), "format": image_format})
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except QmpError as exc:
            raise InvalidState(self.name, self.record.state.value, f"take a screenshot ({exc})") from exc
        finally:
            path.unlink(missing_ok=True)

    async def query_status(self) -> dict[str, object]:
        """QEMU's own view (running flag and status string), bounded like every QMP call."""
        if self._qmp is None or not self._qmp.connected:
            raise NotConnected(self.name)
        return await self._qmp.query_status()

    async def wait_ready(self, timeout: float) -> None:
        rec = self.record
        await self.wait_for(lambda: rec.ready or rec.state.is_final, timeout, f"waiting for {self.name} to be ready")
        if not rec.ready:
            raise InvalidState(self.name, rec.state.value, "wait for readiness")

    def remove_files(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    async def detach(self) -> None:
        """Daemon exit without stopping the VM: let go of QMP and the process watch."""
        self.detached = True
        if self.console is not None:
            await self.console.close(drain=False)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._qmp is not None:
            await self._qmp.close()
        if self._qemu is not None:
            self._qemu.close()


async def discard_leftovers(directory: Path) -> None:
    """Stop what a record we cannot use still names (same processes only), then delete it.

    Used for unreadable or other-version state: parse what can be parsed, best effort.
    """
    try:
        data = read_json(directory / "state.json")
        machine = data.get("machine", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        machine = {}
    records = []
    for key in ("qemu", "reaper"):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            records.append(ProcessRecord.from_json(machine[key]))
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
        records.extend(ProcessRecord.from_json(v) for v in machine["helpers"].values())
    for record in records:
        if is_same_process(record):
            process = ChildProcess("leftover", record.pid, None)
            await process.terminate(TERM_GRACE)
    # A garbled record names no process; the VM's reaper and helpers still name the VM's
    # directory on their command lines (status file, sockets, state): stop those, children first.
    for pid in processes_mentioning(directory):
        for child in [*children_of(pid), pid]:
            with contextlib.suppress(ProcessLookupError):
                await ChildProcess("leftover", child, None).terminate(TERM_GRACE)
    shutil.rmtree(directory, ignore_errors=True)


def processes_mentioning(directory: Path) -> list[int]:
    """Pids whose command line contains `directory` (a VM's processes all do)."""
    needle = os.fsencode(f"{directory}/")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found
