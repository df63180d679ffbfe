# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd's per-VM reaper: QEMU's parent, and the VM's leader process.

QEMU outlives the daemon (restarts, crashes), and a re-adopted QEMU is no longer the
daemon's child: the daemon could see it exit (pidfd) but not learn its status, and on
hosts whose PID 1 does not reap, an orphaned QEMU would stay a zombie. So the daemon
starts this tiny program instead (podman's conmon pattern): it forks QEMU, tells the
daemon QEMU's pid over an inherited pipe, waits for it, writes the exit status
atomically to a file in the VM's runtime directory, and exits.

It is also the process vmspawnd registers with systemd-machined as the VM's leader,
because machined (and machinectl before systemd 261) talk to a VM by signalling its
leader: `machinectl poweroff` sends SIGRTMIN+4, `machinectl reboot` SIGINT, `machinectl
kill --kill-whom=leader` any signal. QEMU itself would die of SIGRTMIN+4 and treat SIGINT
as "terminate", so the reaper translates (systemd's own meaning of those signals):

  SIGRTMIN+4  ACPI power-off, with the deadline and escalation of `vmspawnctl stop`
  SIGINT      reset (reboot)
  anything else it can catch is forwarded to QEMU (SIGTERM ends the VM, and so on)

It asks the daemon first, through the VM's io.systemd.MachineInstance socket, so the
daemon records the stop as its own; when no daemon answers (stopped, restarting) it
speaks QMP to QEMU itself and runs the escalation on its own. If the reaper dies, QEMU
gets SIGKILL (parent-death signal): machined counts a VM as gone when its leader is.

Run as a script with `python3 -I -S reaper.py` (stdlib only, no site): it must start fast
and stay small, one per VM.
Usage: reaper.py [--control=PATH] [--qmp=PATH] [--deadline=SECONDS] [--machined=PATH] STATUS_FILE REPORT_FD -- ARGV...
REPORT_FD is a socket: QEMU's pid goes there, with the connection to machined attached.
"""

import ctypes
import json
import os
import signal
import socket
import sys
import time
import typing

if typing.TYPE_CHECKING:
    from collections.abc import Callable

NAME = b"vmspawnd-reaper"  # its comm (15 bytes, the kernel's limit): QEMU names senders by it
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
CALL_TIMEOUT = 5.0  # one Varlink or QMP exchange
TERM_GRACE = 5.0  # as the daemon's ladder: SIGTERM, then SIGKILL
POWER_OFF = signal.SIGRTMIN + 4
REBOOT = signal.SIGINT
# Faults are the process's own (default action); SIGKILL/SIGSTOP cannot be caught; these
# three are noise or ours (writes to a closed socket) and are dropped.
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}
_FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS}
_DROPPED = {signal.SIGPIPE, signal.SIGWINCH, signal.SIGURG}


def _signal_name(signo: int) -> str:
    # as vmspawnd.parsers.signal_name (this script imports nothing of vmspawnd)
    if signal.SIGRTMIN <= signo <= signal.SIGRTMAX:
        return "SIGRTMIN" if signo == signal.SIGRTMIN else f"SIGRTMIN+{signo - signal.SIGRTMIN}"
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def log(message: str) -> None:
    """One line on stderr, which is the VM's qemu.log (the daemon shows its tail)."""
    try:
        os.write(2, f"vmspawnd-reaper: {message}\n".encode())
    except OSError:
        pass


def _sender(info: "signal.struct_siginfo") -> str:
    if not info.si_pid:
        return ""
    try:
        with open(f"/proc/{info.si_pid}/comm") as f:
            return f" from pid {info.si_pid} ({f.read().strip()})"
    except OSError:
        return f" from pid {info.si_pid}"


def _exchange(path: str, payload: bytes, until: "Callable[[bytes], bool | None]") -> bool:
    """Connect to `path`, send `payload`, read until `until(buffer)` says done; bounded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(CALL_TIMEOUT)
        sock.connect(path)
        sock.sendall(payload)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the reply")
            data += chunk
            result = until(data)
            if result is not None:
                return result


def call_daemon(control: str, method: str) -> bool:
    """io.systemd.MachineInstance.METHOD on the daemon's per-VM socket. True when the
    daemon took the request (an error reply also counts: the daemon knows better, e.g. the
    VM is already stopping); False when no daemon answers."""

    def reply(data: bytes) -> bool | None:
        if b"\0" not in data:
            return None
        answer = json.loads(data.split(b"\0", 1)[0])
        if "error" in answer:
            log(f"vmspawnd answered {method} with {answer['error']}")
        return True

    frame = json.dumps({"method": f"io.systemd.MachineInstance.{method}", "parameters": {}}).encode() + b"\0"
    try:
        return _exchange(control, frame, reply)
    except (OSError, ValueError) as exc:
        log(f"vmspawnd did not take {method} ({exc}); asking QEMU directly")
        return False


def call_qmp(qmp: str, command: str) -> bool:
    """One QMP command on QEMU's monitor socket; QEMU serves it only while no daemon is
    connected (one client at a time), which is exactly when it is needed."""
    state = {"greeted": False, "negotiated": False}

    def reply(data: bytes) -> bool | None:
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            message = json.loads(line)
            if "QMP" in message:
                state["greeted"] = True
            elif "return" in message:
                if state["negotiated"]:
                    return True
                state["negotiated"] = True
            elif "error" in message:
                raise OSError(f"QMP {command}: {message['error'].get('desc', message['error'])}")
        return None

    payload = b'{"execute": "qmp_capabilities"}\n' + json.dumps({"execute": command}).encode() + b"\n"
    try:
        return _exchange(qmp, payload, reply)
    except (OSError, ValueError) as exc:
        log(f"QMP {command} failed: {exc}")
        return False


class Leader:
    """What the leader does for signals; `escalate_at` is when the power-off ladder's next
    step is due (only when the reaper runs the ladder itself)."""

    def __init__(self, qemu_pid: int, control: str | None, qmp: str | None, deadline: float) -> None:
        self.qemu_pid = qemu_pid
        self.control = control
        self.qmp = qmp
        self.deadline = deadline
        self.escalate_at: float | None = None
        self._next = signal.SIGTERM

    def handle(self, info: "signal.struct_siginfo") -> None:
        signo = info.si_signo
        what = f"{_signal_name(signo)}{_sender(info)}"
        if signo == POWER_OFF:
            log(f"{what}: powering the VM off")
            if self.control and call_daemon(self.control, "PowerOff"):
                return
            if self.qmp and call_qmp(self.qmp, "system_powerdown"):
                self.escalate_at = time.monotonic() + self.deadline
                log(f"ACPI power button pressed; terminating QEMU if the guest is still up in {self.deadline:g}s")
            else:
                self.escalate_at = time.monotonic()
        elif signo == REBOOT:
            log(f"{what}: rebooting the VM")
            if not (self.control and call_daemon(self.control, "Reboot")) and self.qmp:
                call_qmp(self.qmp, "system_reset")
        else:
            log(f"{what}: forwarded to QEMU")
            self._kill(signo)

    def escalate(self) -> None:
        """The power-off deadline passed: SIGTERM, and TERM_GRACE later SIGKILL."""
        log(f"the guest did not power off in time: sending {_signal_name(self._next)} to QEMU")
        self._kill(self._next)
        if self._next == signal.SIGTERM:
            self._next = signal.SIGKILL
            self.escalate_at = time.monotonic() + TERM_GRACE
        else:
            self.escalate_at = None

    def _kill(self, signo: int) -> None:
        try:
            os.kill(self.qemu_pid, signo)
        except ProcessLookupError:
            pass


def connect_machined(address: str | None) -> socket.socket | None:
    """A connection to machined's Varlink socket, handed to the daemon with QEMU's pid.

    systemd-machined 258+ takes a machine's *supervisor* from the peer of the connection it
    is registered over, and ends the supervisor (SIGTERM) with the machine where the
    machine has no unit of its own (a user's VMs: their unit is the user's manager). Over
    the reaper's connection the supervisor is the reaper, which ends with the VM anyway —
    never the daemon all VMs share."""
    if not address:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CALL_TIMEOUT)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None  # no machined: the daemon registers (or not) on its own
    return sock


def _parse(argv: list[str]) -> tuple[dict[str, str], str, int, list[str]]:
    options: dict[str, str] = {}
    while argv and argv[0].startswith("--") and argv[0] != "--":
        key, _, value = argv.pop(0)[2:].partition("=")
        options[key] = value
    status_file, pid_fd, separator, *command = argv
    if separator != "--" or not command:
        raise ValueError("no command")
    return options, status_file, int(pid_fd), command


def _exec_qemu(command: list[str], report: int, original_mask: set[int], reaper: int, started: int) -> None:
    """In the child: QEMU dies with its leader, and starts with a clean signal state.

    `started` is the write end of a close-on-exec pipe: it closes when the exec succeeds
    (or the child exits), which tells the reaper that the parent-death signal is set.
    """
    try:
        os.close(report)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != reaper:  # the reaper died between fork and prctl (we were re-parented)
            os._exit(1)
        for signo in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(signo, signal.SIG_DFL)  # Python's own dispositions, not QEMU's
        signal.pthread_sigmask(signal.SIG_SETMASK, original_mask)
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"reaper: cannot execute {command[0]}: {exc.strerror}", file=sys.stderr)
    os._exit(127)


def _write_status(status_file: str, pid: int, code: int) -> None:
    tmp = f"{status_file}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.write(fd, f"{pid} {code}\n".encode())
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, status_file)


def main(argv: list[str]) -> int:
    try:
        options, status_file, report, command = _parse(list(argv))
    except ValueError:
        print(
            "usage: reaper.py [--control=PATH] [--qmp=PATH] [--deadline=SECONDS] [--machined=PATH] "
            "STATUS_FILE REPORT_FD -- ARGV...",
            file=sys.stderr,
        )
        return 2
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, NAME, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # Every signal is taken synchronously with sigtimedwait: no handler can run in the middle
    # of a QMP exchange, and none is lost between two waits.
    handled = {s for s in range(1, signal.SIGRTMAX + 1) if s not in _UNCATCHABLE | _FAULTS and s not in (32, 33)}
    original_mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    machined = connect_machined(options.get("machined"))
    reaper = os.getpid()
    started_read, started_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(started_read)
        _exec_qemu(command, report, original_mask, reaper, started_write)
    os.close(started_write)
    # The pid is reported once QEMU runs (or has failed to): from then on it dies with its
    # leader, so a daemon that kills the leader at once never leaves a QEMU behind.
    os.read(started_read, 1)
    os.close(started_read)
    with socket.socket(fileno=report) as channel:
        socket.send_fds(channel, [f"{pid}\n".encode()], [machined.fileno()] if machined else [])
    if machined is not None:
        machined.close()  # the daemon has it now
    leader = Leader(pid, options.get("control") or None, options.get("qmp") or None, float(options.get("deadline", "60")))
    while True:
        timeout = None if leader.escalate_at is None else max(0.0, leader.escalate_at - time.monotonic())
        info = signal.sigtimedwait(handled, timeout) if timeout is not None else signal.sigwaitinfo(handled)
        if info is None:
            leader.escalate()
            continue
        if info.si_signo == signal.SIGCHLD:
            waited, status = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                _write_status(status_file, pid, os.waitstatus_to_exitcode(status))
                return 0
        elif info.si_signo not in _DROPPED:
            leader.handle(info)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
