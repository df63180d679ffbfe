# SPDX-License-Identifier: LGPL-2.1-or-later
"""Why a VM ended, decided from facts alone (no I/O): its final state and reason.

The facts come from three places that each survive something the others do not:
the exit status the per-VM reaper recorded (QEMU's own status, or the signal that
killed it), QEMU's last words on stderr ("terminating on signal 15 from pid 812
(systemd)": written even while no daemon listens, so it survives a restart), and
the reason of QEMU's SHUTDOWN event on QMP (`host-signal`, `guest-shutdown`, ...),
which the daemon saw only if it was connected. A QEMU that caught SIGTERM/SIGINT/
SIGHUP exits with status 0 like a guest power-off, so status 0 alone never proves
the guest powered off.
"""

from __future__ import annotations

import dataclasses
import re

from vmspawnd.model import MachineState
from vmspawnd.spec.parsers import signal_name

# softmmu/runstate.c qemu_kill_report(), unchanged from QEMU 2.x to 11.
_HOST_SIGNAL = re.compile(r"terminating on signal (\d+)(?: from pid (\d+) \((.*)\))?")


@dataclasses.dataclass(frozen=True)
class HostSignal:
    """A signal QEMU caught and terminated on (it reports the sender where it knows it)."""

    signo: int
    sender_pid: int | None = None
    sender: str | None = None

    def describe(self) -> str:
        sender = ""
        if self.sender_pid:
            sender = f" from pid {self.sender_pid}" + (f" ({self.sender})" if self.sender else "")
        return f"{signal_name(self.signo)}{sender}"


# reaper.py's line when it passes a signal on to QEMU (QEMU then names the reaper as sender).
_FORWARDED = re.compile(r"vmspawnd-reaper: (\S+) from pid (\d+) \((.*)\): forwarded to QEMU")


def parse_host_signal(stderr: str, leader_pid: int | None = None) -> HostSignal | None:
    """The last "terminating on signal N [from pid P (ARGV0)]" QEMU wrote, if any. When the
    sender is the VM's leader (`leader_pid`, the reaper), which forwards what machined or an
    admin sent it, the original sender from the leader's log line is named instead."""
    found = None
    for match in _HOST_SIGNAL.finditer(stderr):
        found = match
    if found is None:
        return None
    pid = int(found[2]) if found[2] else None
    sender = found[3] if found[3] and found[3] != "<unknown process>" else None
    if pid is not None and pid == leader_pid:
        for forwarded in _FORWARDED.finditer(stderr[: found.start()]):
            pid, sender = int(forwarded[2]), forwarded[3]
    return HostSignal(int(found[1]), pid, sender)


@dataclasses.dataclass(frozen=True)
class ExitFacts:
    """Everything known about how QEMU ended."""

    returncode: int | None  # QEMU's exit status, -signal if a signal killed it, None if unknown
    stop_reason: str | None = None  # a stop the daemon carried out (power off, terminate)
    helper_failed: bool = False  # a helper died first and the daemon ended the VM for it
    requested_signal: int | None = None  # vmspawnctl kill / io.vmspawnd.Manager.Kill
    host_signal: HostSignal | None = None  # from QEMU's stderr
    shutdown_cause: str | None = None  # the reason of QMP's last SHUTDOWN event


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: MachineState
    reason: str


def describe_status(returncode: int | None) -> str:
    """A helper's or QEMU's exit in a few words; any signal number has a name."""
    if returncode is None:
        return "status unknown: not our child"
    if returncode < 0:
        return f"killed by {signal_name(-returncode)}"
    return f"status {returncode}"


# QEMU's error_report(): "PROGNAME: [LOCATION: ]MESSAGE", warnings as "PROGNAME: warning: …".
_QEMU_ERROR = re.compile(r"^(?:\S*/)?qemu[\w.+-]*: (?!warning: |info: )(?!terminating on signal )(.+)$", re.MULTILINE)


def qemu_error_line(stderr: str) -> str | None:
    """QEMU's own last error line ("qemu-system-x86_64: -smp 0,foo=1: Parameter 'smp.foo'
    is unexpected"): when QEMU refuses to start, this is the message the user needs, and
    the rest of its output (warnings, the reaper's lines) is context."""
    found = None
    for match in _QEMU_ERROR.finditer(stderr):
        found = match
    return found[0].strip() if found else None


SIGSYS = 31
# A seccomp filter's kill action (QEMU's -sandbox: SCMP_ACT_KILL_PROCESS, else TRAP) ends
# the process with SIGSYS; nothing else on Linux sends it in practice.
SECCOMP_KILL = "QEMU's seccomp sandbox (-sandbox) refused a system call"


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "QEMU exited (status unknown: not our child)"
    if returncode == -SIGSYS:
        return f"QEMU was killed by SIGSYS: {SECCOMP_KILL}"
    if returncode < 0:
        return f"QEMU was killed by {signal_name(-returncode)}"
    return f"QEMU exited with status {returncode}"


def decide_outcome(facts: ExitFacts) -> Outcome:
    """STOPPED for an end somebody meant (the guest, a client, the host's admin or
    service manager); FAILED for a crash, an unexplained death or a failed helper."""
    code = facts.returncode
    if facts.helper_failed:
        return Outcome(MachineState.FAILED, facts.stop_reason or "a helper exited")
    if facts.stop_reason is not None:
        return Outcome(MachineState.STOPPED, facts.stop_reason)
    requested = facts.requested_signal
    if requested is not None:
        if code == -requested:
            return Outcome(MachineState.STOPPED, f"killed with {signal_name(requested)} on request")
        if code == 0 and facts.host_signal is not None and facts.host_signal.signo == requested:
            return Outcome(MachineState.STOPPED, f"terminated with {signal_name(requested)} on request")
    if code == 0 and facts.host_signal is not None:
        return Outcome(MachineState.STOPPED, f"QEMU terminated on {facts.host_signal.describe()}")
    if code == 0 and facts.shutdown_cause == "host-signal":
        return Outcome(MachineState.STOPPED, "QEMU terminated on a signal from the host")
    if code == 0 and facts.shutdown_cause == "host-qmp-quit":
        return Outcome(MachineState.STOPPED, "QEMU quit on a QMP request")
    if code == 0:
        return Outcome(MachineState.STOPPED, "QEMU exited: the guest powered off")
    return Outcome(MachineState.FAILED, describe_exit(code))
