# SPDX-License-Identifier: LGPL-2.1-or-later
"""Child processes that outlive the daemon: spawn, watch by pidfd, stop with a ladder.

VM processes run in their own session with no parent-death signal, so a daemon
restart (or crash) leaves them running; their pid + start time + boot id go into
state.json so that a later daemon can tell "still the same process" from "pid reused".
While the daemon is the parent it watches the child through a pidfd on the event loop
(no SIGCHLD handler, no watcher thread) and reaps it with waitpid, so no zombie remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from vmspawnd.model import ProcessRecord

_log = logging.getLogger(__name__)
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    with open(_BOOT_ID_PATH) as f:
        return f.read().strip()


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat; the comm field may contain spaces and parentheses."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    after_comm = stat[stat.rindex(b")") + 2 :].split()
    return int(after_comm[19])


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (/proc/PID/task/*/children); [] once it is gone."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(word) for word in f.read().split()]
    return found


def process_tree(roots: Sequence[int]) -> list[int]:
    """`roots` and all their descendants, each once, parents before children (so a mover
    takes a parent before it can fork again into the old cgroup)."""
    found: list[int] = []
    queue = list(roots)
    while queue:
        pid = queue.pop(0)
        if pid in found:
            continue
        found.append(pid)
        queue += children_of(pid)
    return found


def describe_process(pid: int) -> ProcessRecord:
    return ProcessRecord(pid=pid, start_time=process_start_time(pid), boot_id=boot_id())


def is_same_process(record: ProcessRecord) -> bool:
    """True only if pid, start time and boot all match: a reused pid is not our VM."""
    try:
        return record.boot_id == boot_id() and process_start_time(record.pid) == record.start_time
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return False


class _Signalable(typing.Protocol):
    name: str
    pid: int

    def send_signal(self, signo: int) -> None: ...

    async def wait(self) -> int | None: ...


async def terminate_ladder(process: _Signalable, grace: float) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL and wait for the end."""
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            return await process.wait()
    except TimeoutError:
        _log.warning("%s (pid %d) ignored SIGTERM for %.0fs, killing", process.name, process.pid, grace)
    process.send_signal(signal.SIGKILL)
    return await process.wait()


class ChildProcess:
    """A process we spawned (and so can reap) or adopted (and can only watch).

    `wait()` resolves when the process has exited; for our own children it also reaps
    them and records the exit status.
    """

    def __init__(self, name: str, pid: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.name = name
        self.pid = pid
        self._popen = popen
        self.returncode: int | None = None
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_exit()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    @property
    def record(self) -> ProcessRecord:
        return describe_process(self.pid)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._popen is not None:
            self.returncode = self._popen.wait()  # reaps; cannot block, the pidfd said so
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    @property
    def exited(self) -> bool:
        return self._exited.done()

    async def wait(self) -> int | None:
        """Wait for exit; the exit status is None for adopted (non-child) processes."""
        return await asyncio.shield(self._exited)

    def send_signal(self, signo: int) -> None:
        if self.exited:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signo)
            else:
                os.kill(self.pid, signo)

    async def terminate(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL and wait: always ends reaped."""
        return await terminate_ladder(self, grace)

    def close(self) -> None:
        """Stop watching without waiting (daemon shutdown leaving VMs running)."""
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def spawn_detached(
    name: str,
    argv: Sequence[str],
    *,
    pass_fds: Sequence[int] = (),
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> ChildProcess:
    """Start `argv` in its own session with stdin /dev/null and output appended to `log_path`.

    Own session: not killed by the daemon's terminal or process group, and no
    parent-death signal, so it outlives the daemon (the restart story builds on this).
    Only `pass_fds` are inherited; everything else the daemon holds is close-on-exec.
    """
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    finally:
        os.close(log_fd)
    # Popen would otherwise reap in its own bookkeeping; ChildProcess owns reaping.
    return ChildProcess(name, popen.pid, popen)


def read_tail(path: Path, max_bytes: int = 4096) -> str:
    """The last `max_bytes` of a log, for error reports (QEMU's stderr tail)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", "replace")


REAPER_SCRIPT = str(Path(__file__).with_name("reaper.py"))
PID_REPORT_TIMEOUT = 10.0


def read_exit_status(path: Path) -> int | None:
    """What the reaper recorded: QEMU's exit code, or -signal; None if it never wrote one."""
    try:
        _pid, code = path.read_text().split()
        return int(code)
    except (FileNotFoundError, ValueError):
        return None


class ReapedProcess:
    """QEMU under its per-VM reaper (vmspawnd/reaper.py): same interface as ChildProcess.

    The daemon watches QEMU itself through a pidfd (it is not our child) and learns its exit
    status from the file the reaper writes before exiting, which works the same before and
    after a daemon restart. Signals go straight to QEMU.
    """

    def __init__(self, name: str, qemu: ChildProcess | _ExitedProcess, reaper: ChildProcess | None, status_path: Path) -> None:
        self.name = name
        self.pid = qemu.pid
        self._qemu = qemu
        self.reaper = reaper
        self._status_path = status_path
        self.returncode: int | None = None
        # The reaper's own connection to machined (reaper.py --machined): registering over it
        # makes machined take the reaper, not the shared daemon, as the VM's supervisor.
        self.machined_connection: socket.socket | None = None

    @property
    def record(self) -> ProcessRecord:
        return self._qemu.record

    @property
    def exited(self) -> bool:
        return self._qemu.exited

    async def wait(self) -> int | None:
        await self._qemu.wait()
        reaper_status = await self.reaper.wait() if self.reaper is not None else None  # it exits right after writing the status
        self.returncode = read_exit_status(self._status_path)
        if self.returncode is None and reaper_status is not None and reaper_status < 0:
            # The reaper was killed (only SIGKILL can, it takes every other signal) before
            # it could write QEMU's status; QEMU then died of its parent-death signal,
            # SIGKILL, if the same kill (KillUnit of the whole scope) had not got it first.
            self.returncode = -signal.SIGKILL
        return self.returncode

    def send_signal(self, signo: int) -> None:
        self._qemu.send_signal(signo)

    async def terminate(self, grace: float = 5.0) -> int | None:
        return await terminate_ladder(self, grace)

    def close(self) -> None:
        self._qemu.close()
        if self.reaper is not None:
            self.reaper.close()

    @classmethod
    def adopt(cls, name: str, qemu: ProcessRecord, reaper: ProcessRecord | None, status_path: Path) -> ReapedProcess:
        """Watch a QEMU started by an earlier daemon; only if pid *and* start time match."""
        loop_child = ChildProcess(name, qemu.pid, None) if is_same_process(qemu) else _ExitedProcess(name, qemu.pid)
        reaper_child = None
        if reaper is not None and is_same_process(reaper):
            reaper_child = ChildProcess("reaper", reaper.pid, None)
        return cls(name, loop_child, reaper_child, status_path)


class _ExitedProcess:
    """Stand-in for a recorded process that is gone (or whose pid now belongs to another)."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.returncode: int | None = None
        self.exited = True

    @property
    def record(self) -> ProcessRecord:
        return ProcessRecord(self.pid, 0, "")

    async def wait(self) -> int | None:
        return None

    def send_signal(self, signo: int) -> None:
        pass

    def close(self) -> None:
        pass


async def spawn_reaped(
    name: str,
    argv: Sequence[str],
    *,
    pass_fds: Sequence[int] = (),
    log_path: Path,
    status_path: Path,
    leader_options: Sequence[str] = (),
    cwd: Path | None = None,
) -> ReapedProcess:
    """Start `argv` under a reaper; returns once the reaper reported the child's pid.

    `leader_options` tell the reaper, as the VM's leader, where to forward machined's
    signals (--control=, --qmp=, --deadline=) and where machined listens (--machined=: it
    connects there and hands the connection over, `ReapedProcess.machined_connection`;
    see reaper.py). `cwd`: where the reaper, and so the child, start."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            reaper = spawn_detached(
                "reaper",
                [sys.executable, "-I", "-S", REAPER_SCRIPT, *leader_options, str(status_path), str(theirs.fileno()), "--", *argv],
                pass_fds=[*pass_fds, theirs.fileno()],
                log_path=log_path,
                cwd=cwd,
            )
        finally:
            theirs.close()
        pid, connection = await _read_report(ours, reaper)
    finally:
        ours.close()
    process = ReapedProcess(name, ChildProcess(name, pid, None), reaper, status_path)
    process.machined_connection = connection
    return process


async def _read_report(sock: socket.socket, reaper: ChildProcess) -> tuple[int, socket.socket | None]:
    """The reaper's report: QEMU's pid, with its connection to machined attached if it made one."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock, wake)
    try:
        async with asyncio.timeout(PID_REPORT_TIMEOUT):
            await readable
    except TimeoutError:
        await reaper.terminate(1.0)
        raise OSError(f"the reaper did not report a pid within {PID_REPORT_TIMEOUT:g}s") from None
    finally:
        loop.remove_reader(sock)
    # One message: the pid and the fd travel together (SCM_RIGHTS), so one read has both.
    data, fds, _flags, _address = socket.recv_fds(sock, 64, 1)
    connection = socket.socket(fileno=fds[0]) if fds else None
    if not data.strip().isdigit():
        if connection is not None:
            connection.close()
        await reaper.wait()
        raise OSError("the reaper could not start the process (see the VM's qemu.log)")
    return int(data), connection


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
