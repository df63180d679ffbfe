# SPDX-License-Identifier: LGPL-2.1-or-later
"""Adoption: a restarted daemon takes back the VMs an earlier one started.

The part of Machine that runs once, instead of `start`, when the daemon comes back: it
reconciles the record with the processes that are really there (libvirt's way) and
reconnects the channels (QMP, control socket, notify listener, console) on the addresses
the guest and the clients already know. Kept apart from machine.py because it is a second
way into a running VM, with its own failure cases, not part of running one.
"""

from __future__ import annotations

import logging
import signal
import typing
from pathlib import Path

from vmspawnd.errors import NotConnected, StartFailed, Timeout, VmspawnError
from vmspawnd.helpers import stop_recorded_helpers
from vmspawnd.host.machined import info_for
from vmspawnd.host.process import ChildProcess, ReapedProcess, is_same_process
from vmspawnd.host.registration import register_machine
from vmspawnd.host.scope import scope_unit_name
from vmspawnd.model import MachineState
from vmspawnd.qemu.console import ConsoleHub
from vmspawnd.qemu.guest_notify import NotifyListener, reopen_listener

if typing.TYPE_CHECKING:
    from vmspawnd.machine import Machine

_log = logging.getLogger("vmspawnd.machine")  # the machine's log lines, wherever written


async def adopt(machine: Machine) -> bool:
    """Take over a VM an earlier daemon started, reconciling like libvirt.

    Processes count as ours only if pid *and* start time (and boot) match. Mid-start →
    torn down (returns False: forget it); QEMU gone → recorded as ended, leftovers
    cleaned; shutdown in progress → finished; running → QMP, control socket, notify
    listener and console come back on the addresses the guest and clients know.
    Events emitted while no daemon listened are lost: state is re-queried instead.
    """
    rec = machine.record
    if rec.state.is_final:
        machine._finished.set()
        return True
    if rec.qemu is not None:
        machine._qemu = ReapedProcess.adopt("qemu", rec.qemu, rec.reaper, machine.paths.exit_status)
    if rec.state is MachineState.STARTING:
        _log.warning("%s: was starting when the daemon stopped; tearing it down", machine.name)
        if machine._qemu is not None and not machine._qemu.exited:
            machine._qemu.send_signal(signal.SIGKILL)
            await machine._qemu.wait()
        await stop_recorded_helpers(rec.helpers, machine.name, machine.directory, rec.ssh_private_key_path)
        machine.remove_files()
        return False
    if rec.state is MachineState.STOPPING:
        machine._stop_reason = rec.reason or "stopped on request"
    if machine._qemu is None or machine._qemu.exited:
        _log.info("%s: QEMU ended while the daemon was not running", machine.name)
        await machine._finish(await machine._qemu.wait() if machine._qemu is not None else None)
        return True
    machine._helpers = {
        name: ChildProcess(name, record.pid, None) for name, record in rec.helpers.items() if is_same_process(record)
    }
    missing = [name for name in rec.helpers if name not in machine._helpers]
    await _reconnect(machine)
    await _renew_registration(machine)
    machine._supervisor = machine._tasks.spawn(machine._supervise(), "supervise")
    if missing:
        machine._stop_reason = f"helper {missing[0]} exited while vmspawnd was not running"
        machine._helper_failed = True
        machine._qemu.send_signal(signal.SIGTERM)
    elif rec.state is MachineState.STOPPING:
        _log.info("%s: finishing the shutdown that was in progress", machine.name)
        machine._tasks.spawn(machine._escalate(), "finish the shutdown")
    _log.info("%s: adopted (QEMU pid %d)", machine.name, machine._qemu.pid)
    return True


async def _renew_registration(machine: Machine) -> None:
    """After a restart: register the VM with machined again if it was (machined drops a
    machine whose unit stopped, e.g. the caller's unit of a --keep-unit VM, and forgets
    everything when it restarts itself), and take its scope back, so that the VM's end
    releases them as a VM that never saw a restart would."""
    rec = machine.record
    if not rec.registered and not rec.unit:
        return
    try:
        machine._registration = await register_machine(
            info_for(rec, machine.spec, machine._leader_pid()),
            register=machine.spec.register if rec.registered else False,
            keep_unit=machine.spec.keep_unit,
            adopting=True,
        )
    except (StartFailed, OSError) as exc:
        _log.warning("%s: could not register the adopted VM again: %s", machine.name, exc)
        return
    if rec.unit == scope_unit_name(machine.name) and not machine.spec.keep_unit:
        machine._registration.scope_unit = rec.unit
    rec.registered = machine._registration.registered


async def _reconnect(machine: Machine) -> None:
    """QMP (bounded), control socket, notify listener and console, as before the restart."""
    rec = machine.record
    try:
        status = await machine.monitor.reconnect()
        rec.paused = status.get("status") == "paused"
    except (Timeout, NotConnected) as exc:
        _log.error("%s: QMP did not answer after the restart (%s); lifecycle calls will fail", machine.name, exc)
    if rec.control_address:
        machine._control = await machine.settings.serve_control(machine, Path(rec.control_address))
    if rec.notify_address:
        sock, _address = reopen_listener(rec.notify_address, machine.paths.notify)
        machine._notify_listener = NotifyListener(sock, rec.notify_address, machine._on_notify, machine.name)
        await machine._notify_listener.start()
    if rec.console_address:
        hub = ConsoleHub(machine.name, machine.paths.console, machine.paths.console_log)
        try:
            await hub.connect()
            machine.console = hub
        except (OSError, TimeoutError, VmspawnError) as exc:
            _log.error("%s: console did not come back after the restart: %s", machine.name, exc)
    machine._persist()
