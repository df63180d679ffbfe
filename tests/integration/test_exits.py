# SPDX-License-Identifier: LGPL-2.1-or-later
"""A VM's end is named from its real cause, and its leader does what machined means.

QEMU killed from outside with any signal (a realtime one included) ends the VM within
seconds with that signal in the reason, and the VM answers Terminate/Remove afterwards.
The reaper, registered with machined as the leader, turns SIGRTMIN+4 into an ACPI
power-off and SIGINT into a reset — with the daemon running, and with no daemon at all.
machined itself is not here (the system tier drives the same through machinectl).
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from vmspawnctl.varlink import JsonObject, VarlinkError

from tests.guest.build import Guest
from tests.support import Console, Daemon, EventStream, make_runtime_dir, orphans_reaped, spawn_waiting, start_daemon, stop_daemon

pytestmark = pytest.mark.vm

RTMIN4 = int(signal.SIGRTMIN) + 4
END_WITHIN = 5.0  # seconds from the signal to the recorded end (the bound)


def ended_after(daemon: Daemon, name: str, send: Callable[[], object]) -> tuple[JsonObject, float]:
    """Call `send()`, wait for the VM's final state; returns its record and the seconds it took."""
    with EventStream(daemon, name) as events:
        started = time.monotonic()
        send()
        events.wait_state(name, "stopped", "failed")
        took = time.monotonic() - started
    return daemon.call("Describe", {"name": name})["machine"], took


@pytest.mark.parametrize(
    ("signo", "state", "reason"),
    [
        (RTMIN4, "failed", "QEMU was killed by SIGRTMIN+4"),
        (signal.SIGKILL, "failed", "QEMU was killed by SIGKILL"),
        # QEMU catches SIGTERM and exits 0: not "the guest powered off".
        (signal.SIGTERM, "stopped", f"QEMU terminated on SIGTERM from pid {os.getpid()}"),
    ],
)
def test_qemu_killed_from_outside_ends_with_the_signal_named(
    daemon: Daemon, guest: Guest, signo: int, state: str, reason: str
) -> None:
    name = f"killed-{signo}"
    machine = spawn_waiting(daemon, guest, name)
    qemu = machine["qemu"]["pid"]
    final, took = ended_after(daemon, name, lambda: os.kill(qemu, signo))
    assert final["state"] == state and str(final["reason"]).startswith(reason), final
    assert took < END_WITHIN, f"the VM took {took:.1f}s to be recorded as ended"
    with pytest.raises(VarlinkError) as refused:  # answered at once, not hanging on a dead QEMU
        daemon.call("Terminate", {"name": name}, timeout=10)
    assert refused.value.name == "io.vmspawnd.Manager.InvalidState"
    daemon.call("Remove", {"name": name}, timeout=10)


def test_kill_takes_realtime_signal_names(daemon: Daemon, guest: Guest) -> None:
    spawn_waiting(daemon, guest, "rt")
    refused = daemon.ctl("kill", "rt", "--signal=SIGFOO")
    assert refused.returncode != 0 and "--signal" in refused.stderr and "SIGRTMIN+4" in refused.stderr, refused.stderr
    with pytest.raises(VarlinkError) as invalid:
        daemon.call("Kill", {"name": "rt", "signal": 99})
    assert invalid.value.name == "io.vmspawnd.Manager.InvalidSpec"
    assert invalid.value.parameters["field"] == "signal"
    final, _ = ended_after(daemon, "rt", lambda: daemon.ctl("kill", "rt", "--signal=SIGRTMIN+4", check=True))
    assert (final["state"], final["reason"]) == ("stopped", "killed with SIGRTMIN+4 on request"), final
    daemon.call("Remove", {"name": "rt"})


def wait_in_log(console: Console, offset: int, needle: bytes, timeout: float = 120) -> None:
    """Wait until the console log has `needle` past `offset` (QEMU logs every byte once;
    the console's live stream only serves as the wake-up)."""
    deadline = time.monotonic() + timeout
    while needle not in console.log_path.read_bytes()[offset:]:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {needle!r} in the console log after offset {offset}"
        if select.select([console.sock], [], [], min(remaining, 1.0))[0]:
            console.sock.recv(65536)


def test_leader_turns_rtmin4_into_acpi_power_off_and_sigint_into_reset(daemon: Daemon, guest: Guest) -> None:
    machine = spawn_waiting(daemon, guest, "led")
    leader = machine["reaper"]["pid"]
    with Console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
        with EventStream(daemon, "led") as events:
            offset = console.log_path.stat().st_size
            os.kill(leader, signal.SIGINT)  # machinectl reboot (systemd < 261)
            events.wait_event("led", "RESET")
        wait_in_log(console, offset, b"VMSPAWND-TEST: acpid-running")  # the guest booted again
        assert daemon.call("Describe", {"name": "led"})["machine"]["state"] in ("running", "ready")
        offset = console.log_path.stat().st_size
        final, _ = ended_after(daemon, "led", lambda: os.kill(leader, RTMIN4))  # machinectl poweroff
        wait_in_log(console, offset, b"VMSPAWND-TEST: acpi-powerdown")  # through ACPI, not a kill
    assert (final["state"], final["reason"]) == ("stopped", "powered off on request"), final
    daemon.call("Remove", {"name": "led"})


def test_leader_powers_off_while_no_daemon_runs(guest: Guest) -> None:
    with orphans_reaped():
        leader_powers_off_without_daemon(guest)


def leader_powers_off_without_daemon(guest: Guest) -> None:
    runtime = make_runtime_dir()
    first = start_daemon(runtime)
    second = None
    try:
        machine = spawn_waiting(first, guest, "orphan")
        with Console(machine) as console:
            console.wait_for(r"VMSPAWND-TEST: acpid-running")
        first.process.send_signal(signal.SIGTERM)  # the daemon goes; the VM stays
        first.process.wait(30)
        reaper = machine["reaper"]["pid"]
        os.kill(reaper, RTMIN4)
        # The leader presses the button over QMP itself; the guest powers off and the
        # reaper exits after recording QEMU's status. Its pidfd says when.
        pidfd = os.pidfd_open(reaper)
        try:
            assert select.select([pidfd], [], [], 60)[0], "the VM did not power off without the daemon"
        finally:
            os.close(pidfd)
        second = start_daemon(runtime)
        final = second.call("Describe", {"name": "orphan"})["machine"]
        assert final["state"] == "stopped" and final["reason"] == "QEMU exited: the guest powered off", final
        log = Path(str(machine["consoleLog"])).read_text(errors="replace")  # QEMU logs with no daemon too
        assert "VMSPAWND-TEST: acpi-powerdown" in log
    finally:
        stop_daemon(second or first)
        if second is not None and first.alive():
            stop_daemon(first)
