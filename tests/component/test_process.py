# SPDX-License-Identifier: LGPL-2.1-or-later
"""host/process.py with real processes: tiny `python -c` and `sh -c` children stand in
for QEMU and the helpers (the code does not care what it spawns).

The shutdown ladder, reaping, the detached spawn, the reaper's status file, and adoption
by identity (pid + start time + boot id, never the pid alone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import process_state
from vmspawnd.host.process import (
    ChildProcess,
    ReapedProcess,
    describe_process,
    is_same_process,
    process_tree,
    spawn_detached,
    spawn_reaped,
)

GRACE = 0.3  # the ladder's SIGTERM grace in these tests; the daemon's is seconds

# Installs its SIGTERM disposition, then says so on the fd it was given, then waits.
STUBBORN = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " os.write(int(sys.argv[1]), b'r'); time.sleep(600)"
)
COOPERATIVE = "import os, sys, time; os.write(int(sys.argv[1]), b'r'); time.sleep(600)"


def gone(pid: int) -> bool:
    """Exited and reaped: no /proc entry at all (a zombie still has one)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def ready_pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


async def spawn_ready(tmp_path: Path, code: str, pipe: tuple[int, int]) -> ChildProcess:
    """Spawn `code` detached and wait until it reports that its signal setup is done."""
    r, w = pipe
    child = spawn_detached("child", [sys.executable, "-c", code, str(w)], pass_fds=[w], log_path=tmp_path / "child.log")
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.run_in_executor(None, os.read, r, 1), 30) == b"r"
    return child


@pytest.mark.asyncio
async def test_ladder_kills_a_child_that_ignores_sigterm(tmp_path: Path, ready_pipe: tuple[int, int]) -> None:
    child = await spawn_ready(tmp_path, STUBBORN, ready_pipe)
    started = time.monotonic()
    assert await child.terminate(GRACE) == -signal.SIGKILL
    assert time.monotonic() - started >= GRACE  # SIGTERM got its grace first
    assert gone(child.pid)  # reaped by the ladder itself


@pytest.mark.asyncio
async def test_ladder_stops_at_sigterm_when_the_child_obeys(tmp_path: Path, ready_pipe: tuple[int, int]) -> None:
    child = await spawn_ready(tmp_path, COOPERATIVE, ready_pipe)
    assert await child.terminate(30) == -signal.SIGTERM  # ended by SIGTERM, long before the grace
    assert gone(child.pid)


@pytest.mark.asyncio
async def test_exit_is_seen_and_reaped_without_being_asked(tmp_path: Path) -> None:
    child = spawn_detached("child", ["sh", "-c", "exit 7"], log_path=tmp_path / "child.log")
    assert await child.wait() == 7
    assert child.exited and child.returncode == 7 and gone(child.pid)
    child.send_signal(signal.SIGKILL)  # after the end: a no-op, never a signal to a reused pid
    assert await child.terminate(GRACE) == 7


@pytest.mark.asyncio
async def test_detached_spawn_runs_in_its_own_session_with_only_the_passed_fds(
    tmp_path: Path, ready_pipe: tuple[int, int]
) -> None:
    log = tmp_path / "child.log"
    log.write_text("earlier run\n")
    _r, w = ready_pipe
    script = (
        "import os, sys\n"
        "def resolves(fd):\n"
        "    try: return bool(os.readlink(f'/proc/self/fd/{fd}'))\n"
        "    except FileNotFoundError: return False  # listdir's own fd, closed by now\n"
        "print(os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid(), flush=True)\n"
        "print(*sorted(int(fd) for fd in os.listdir('/proc/self/fd') if resolves(fd)), flush=True)\n"
        "print(os.readlink('/proc/self/fd/0'), flush=True)\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    child = spawn_detached("child", [sys.executable, "-I", "-c", script], pass_fds=[w], log_path=log)
    assert await child.wait() == 0
    assert log.read_text().splitlines() == [
        "earlier run",  # appended, never truncated
        "True True",  # own session: no terminal or process-group signal reaches it
        f"0 1 2 {w}",  # stdin, stdout, stderr and the passed fd: nothing else of ours
        "/dev/null",
        "to stderr",
    ]


@pytest.mark.asyncio
async def test_new_log_is_private(tmp_path: Path) -> None:
    child = spawn_detached("child", ["true"], log_path=tmp_path / "new.log")
    await child.wait()
    assert ((tmp_path / "new.log").stat().st_mode & 0o777) == 0o600


@pytest.mark.asyncio
async def test_identity_is_pid_start_time_and_boot(tmp_path: Path, ready_pipe: tuple[int, int]) -> None:
    child = await spawn_ready(tmp_path, COOPERATIVE, ready_pipe)
    record = describe_process(child.pid)
    try:
        assert is_same_process(record)
        assert not is_same_process(dataclasses.replace(record, start_time=record.start_time + 1))  # pid reused
        assert not is_same_process(dataclasses.replace(record, boot_id="0" * 32))  # recorded before a reboot
    finally:
        await child.terminate(GRACE)
    assert not is_same_process(record)  # gone


@pytest.mark.asyncio
async def test_process_tree_lists_parents_before_children(tmp_path: Path) -> None:
    reaped = await spawn_reaped("sleeper", ["sleep", "600"], log_path=tmp_path / "log", status_path=tmp_path / "exit")
    try:
        assert reaped.reaper is not None
        assert process_tree([reaped.reaper.pid]) == [reaped.reaper.pid, reaped.pid]
    finally:
        await reaped.terminate(GRACE)


@pytest.mark.asyncio
async def test_reaped_process_status_comes_from_the_reaper(tmp_path: Path) -> None:
    status = tmp_path / "exit"
    reaped = await spawn_reaped("qemu", ["sh", "-c", "exit 7"], log_path=tmp_path / "log", status_path=status)
    assert reaped.reaper is not None
    assert await reaped.wait() == 7
    assert status.read_text() == f"{reaped.pid} 7\n"
    assert gone(reaped.reaper.pid)  # the daemon reaped the reaper; the reaper reaped QEMU


@pytest.mark.asyncio
async def test_reaped_process_killed_reports_the_signal(tmp_path: Path) -> None:
    reaped = await spawn_reaped("qemu", ["sleep", "600"], log_path=tmp_path / "log", status_path=tmp_path / "exit")
    reaped.send_signal(signal.SIGKILL)
    assert await reaped.wait() == -signal.SIGKILL


@pytest.mark.asyncio
async def test_reaper_reports_a_command_it_cannot_execute(tmp_path: Path) -> None:
    log = tmp_path / "log"
    reaped = await spawn_reaped("qemu", [str(tmp_path / "no-such-qemu")], log_path=log, status_path=tmp_path / "exit")
    assert await reaped.wait() == 127
    assert "cannot execute" in log.read_text()


@pytest.mark.asyncio
async def test_adoption_watches_the_same_process_and_learns_its_status(tmp_path: Path) -> None:
    """A restarted daemon adopts QEMU by identity: it sees the exit through a pidfd and
    reads the status the reaper wrote (it is no longer the parent of either)."""
    status = tmp_path / "exit"
    first = await spawn_reaped("qemu", ["sleep", "600"], log_path=tmp_path / "log", status_path=status)
    assert first.reaper is not None
    first.close()  # the first daemon lets go without stopping anything
    adopted = ReapedProcess.adopt("qemu", first.record, first.reaper.record, status)
    assert not adopted.exited and adopted.reaper is not None
    adopted.send_signal(signal.SIGTERM)
    assert await adopted.wait() == -signal.SIGTERM
    os.waitpid(first.reaper.pid, 0)  # our child still (the first "daemon" was this process): reap it


@pytest.mark.asyncio
async def test_adoption_refuses_a_reused_pid(tmp_path: Path, ready_pipe: tuple[int, int]) -> None:
    """A record whose start time does not match names someone else's process: it counts as
    gone, and nothing is ever sent to it."""
    stranger = await spawn_ready(tmp_path, COOPERATIVE, ready_pipe)
    try:
        record = describe_process(stranger.pid)
        stale = dataclasses.replace(record, start_time=record.start_time - 1)
        adopted = ReapedProcess.adopt("qemu", stale, stale, tmp_path / "exit")
        assert adopted.exited and adopted.reaper is None
        assert await adopted.wait() is None  # no status file: unknown
        adopted.send_signal(signal.SIGKILL)
        assert not stranger.exited and process_state(stranger.pid) != "Z"
    finally:
        await stranger.terminate(GRACE)
