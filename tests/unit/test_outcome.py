# SPDX-License-Identifier: LGPL-2.1-or-later
"""How a VM's end is named: decide_outcome() and QEMU's "terminating on signal" line."""

from __future__ import annotations

import signal

import pytest

from vmspawnd.model import MachineState
from vmspawnd.outcome import ExitFacts, HostSignal, Outcome, decide_outcome, describe_exit, parse_host_signal

RTMIN4 = int(signal.SIGRTMIN) + 4


def test_parse_host_signal_with_sender() -> None:
    stderr = "noise\nqemu-system-x86_64: terminating on signal 15 from pid 812 (systemd)\n"
    assert parse_host_signal(stderr) == HostSignal(15, 812, "systemd")


def test_parse_host_signal_takes_the_last_and_handles_unknown_senders() -> None:
    stderr = (
        "qemu-system-x86_64: terminating on signal 2\n"
        "qemu-system-x86_64: terminating on signal 1 from pid 9 (<unknown process>)\n"
    )
    assert parse_host_signal(stderr) == HostSignal(1, 9, None)
    assert parse_host_signal("qemu-system-x86_64: terminating on signal 2\n") == HostSignal(2)
    assert parse_host_signal("the guest said: goodbye\n") is None


def test_a_signal_the_leader_forwarded_names_the_original_sender() -> None:
    stderr = (
        "vmspawnd-reaper: SIGTERM from pid 311 (systemd-machine): forwarded to QEMU\n"
        "qemu-system-x86_64: terminating on signal 15 from pid 42 (/opt/vmspawnd/bin/python3)\n"
    )
    assert parse_host_signal(stderr, leader_pid=42) == HostSignal(15, 311, "systemd-machine")
    # Only the leader's forwards count, and only those before QEMU's line (its cause).
    assert parse_host_signal(stderr, leader_pid=7) == HostSignal(15, 42, "/opt/vmspawnd/bin/python3")
    reversed_order = stderr.splitlines()[1] + "\n" + stderr.splitlines()[0]
    assert parse_host_signal(reversed_order, leader_pid=42) == HostSignal(15, 42, "/opt/vmspawnd/bin/python3")


def test_host_signal_description() -> None:
    assert HostSignal(15, 812, "systemd").describe() == "SIGTERM from pid 812 (systemd)"
    assert HostSignal(RTMIN4).describe() == "SIGRTMIN+4"


@pytest.mark.parametrize(
    ("facts", "state", "reason"),
    [
        # A realtime signal has a name too (machined's SIGRTMIN+4 killed QEMU before the
        # reaper was the leader; naming it raised ValueError and wedged the VM).
        (ExitFacts(-RTMIN4), MachineState.FAILED, "QEMU was killed by SIGRTMIN+4"),
        (ExitFacts(-9), MachineState.FAILED, "QEMU was killed by SIGKILL"),
        (ExitFacts(-70), MachineState.FAILED, "QEMU was killed by signal 70"),
        (ExitFacts(0), MachineState.STOPPED, "QEMU exited: the guest powered off"),
        # QEMU that caught SIGTERM exits 0: that is no guest power-off.
        (
            ExitFacts(0, host_signal=HostSignal(15, 1, "systemd")),
            MachineState.STOPPED,
            "QEMU terminated on SIGTERM from pid 1 (systemd)",
        ),
        (ExitFacts(0, shutdown_cause="host-signal"), MachineState.STOPPED, "QEMU terminated on a signal from the host"),
        (ExitFacts(0, shutdown_cause="host-qmp-quit"), MachineState.STOPPED, "QEMU quit on a QMP request"),
        (ExitFacts(0, shutdown_cause="guest-shutdown"), MachineState.STOPPED, "QEMU exited: the guest powered off"),
        (ExitFacts(1), MachineState.FAILED, "QEMU exited with status 1"),
        (ExitFacts(None), MachineState.FAILED, "QEMU exited (status unknown: not our child)"),
        (ExitFacts(-9, requested_signal=9), MachineState.STOPPED, "killed with SIGKILL on request"),
        (ExitFacts(-RTMIN4, requested_signal=RTMIN4), MachineState.STOPPED, "killed with SIGRTMIN+4 on request"),
        (
            ExitFacts(0, requested_signal=15, host_signal=HostSignal(15, 4, "vmspawnd")),
            MachineState.STOPPED,
            "terminated with SIGTERM on request",
        ),
        (ExitFacts(-9, stop_reason="terminated on request"), MachineState.STOPPED, "terminated on request"),
        (
            ExitFacts(-15, stop_reason="helper swtpm exited (status 1)", helper_failed=True),
            MachineState.FAILED,
            "helper swtpm exited (status 1)",
        ),
    ],
)
def test_decide_outcome(facts: ExitFacts, state: MachineState, reason: str) -> None:
    assert decide_outcome(facts) == Outcome(state, reason)


def test_describe_exit_never_raises_for_any_status() -> None:
    for code in range(-130, 256):
        assert describe_exit(code)


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        ("qemu-system-x86_64: Parameter 'smp.foo' is unexpected\n", "qemu-system-x86_64: Parameter 'smp.foo' is unexpected"),
        # Warnings and the reaper's lines are context; the last error is the one that ended QEMU.
        (
            "qemu-system-x86_64: warning: Deprecated CPU topology\nvmspawnd-reaper: started\n"
            "qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file or directory\n",
            "qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file or directory",
        ),
        (
            "/usr/bin/qemu-kvm: -smp 2,maxcpus=1: Invalid CPU topology\n",
            "/usr/bin/qemu-kvm: -smp 2,maxcpus=1: Invalid CPU topology",
        ),
        ("qemu-system-x86_64: terminating on signal 15 from pid 1 (systemd)\n", None),
        ("qemu-system-x86_64: warning: host doesn't support requested feature\n", None),
        ("", None),
    ],
)
def test_qemu_error_line_is_qemus_last_error(stderr: str, line: str | None) -> None:
    from vmspawnd.outcome import qemu_error_line

    assert qemu_error_line(stderr) == line
