# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd's per-VM reaper: QEMU's parent, so QEMU's exit status is never lost.

QEMU outlives the daemon (restarts, crashes), and a re-adopted QEMU is no longer the
daemon's child: the daemon could see it exit (pidfd) but not learn its status, and on
hosts whose PID 1 does not reap, an orphaned QEMU would stay a zombie. So the daemon
starts this tiny program instead (podman's conmon pattern): it forks QEMU, tells the
daemon QEMU's pid over an inherited pipe, waits for it, writes the exit status
atomically to a file in the VM's runtime directory, and exits.

Run as a script with `python3 -I -S reaper.py` (stdlib only, no site): it must start fast
and stay small, one per VM. Usage: reaper.py STATUS_FILE PID_FD -- ARGV...
"""

import os
import signal
import sys


def main(argv: list[str]) -> int:
    status_file, pid_fd, separator, *command = argv
    if separator != "--" or not command:
        print("usage: reaper.py STATUS_FILE PID_FD -- ARGV...", file=sys.stderr)
        return 2
    report = int(pid_fd)
    # Only QEMU is ever signalled; a stray SIGTERM/SIGINT/SIGHUP for the whole session
    # must not kill the one process that knows QEMU's status.
    for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signo, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report)
            for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(signo, signal.SIG_DFL)
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"reaper: cannot execute {command[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127)
    os.write(report, f"{pid}\n".encode())
    os.close(report)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    tmp = f"{status_file}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.write(fd, f"{pid} {code}\n".encode())
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, status_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
