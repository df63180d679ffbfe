# SPDX-License-Identifier: LGPL-2.1-or-later
"""qemu/qmp.py's session against the fake QEMU (tests/fakes/fake_qemu.py; held to the real
QEMU's behaviour by test_fake_qemu.py): every wait is bounded, errors are typed, events
arrive in order, and a lost peer is reported exactly once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from tests.fakes import fake_qemu_process
from vmspawnd.errors import NotConnected, Timeout
from vmspawnd.qemu.qmp import QmpError, QmpSession

SHORT = 0.3  # bounds in these tests; the daemon's are seconds


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self.changed = asyncio.Event()

    def on_event(self, name: str, data: dict[str, object]) -> None:
        self.events.append((name, data))
        self.changed.set()

    def on_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    async def wait_events(self, count: int) -> list[tuple[str, dict[str, object]]]:
        async with asyncio.timeout(10):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.events


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


@pytest.mark.asyncio
async def test_commands_and_events_in_order(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp) as qemu:
        seen = Recorder()
        session = QmpSession("vm", seen.on_event, seen.on_disconnect)
        await session.connect(str(qemu.qmp_path))
        try:
            assert session.connected
            assert await session.query_status() == {"status": "prelaunch", "singlestep": False, "running": False}
            await session.execute("cont")
            await session.execute("stop")
            await session.execute("system_reset")
            events = await seen.wait_events(3)
            assert events == [("RESUME", {}), ("STOP", {}), ("RESET", {"guest": False, "reason": "host-qmp-system-reset"})]
            assert (await session.query_status())["status"] == "paused"
        finally:
            await session.close()
        assert seen.disconnects == 0  # closing is not losing the peer
        assert not session.connected
        assert other_tasks() == set()  # the pump and the watch are gone with the session


@pytest.mark.asyncio
async def test_events_that_arrive_together_are_all_delivered(short_tmp: Path) -> None:
    """Two commands in flight at once: QEMU writes STOP and RESUME back to back, and the
    session reads both before its pump runs. Neither may be lost (a lost RESUME would leave
    a running VM recorded as paused)."""
    with fake_qemu_process(short_tmp) as qemu:
        seen = Recorder()
        session = QmpSession("vm", seen.on_event, seen.on_disconnect)
        await session.connect(str(qemu.qmp_path))
        try:
            await session.execute("cont")
            for _ in range(5):
                await asyncio.gather(session.execute("stop"), session.execute("cont"))
            events = await seen.wait_events(11)
            assert [name for name, _ in events] == ["RESUME", *["STOP", "RESUME"] * 5]
        finally:
            await session.close()


@pytest.mark.asyncio
async def test_qemu_errors_are_typed(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "error=stop") as qemu:
        session = QmpSession("vm", lambda *_: None)
        await session.connect(str(qemu.qmp_path))
        try:
            with pytest.raises(QmpError) as failed:
                await session.execute("stop")
            assert failed.value.error_class == "GenericError"
            with pytest.raises(QmpError) as unknown:
                await session.execute("no-such-command")
            assert unknown.value.error_class == "CommandNotFound"
            assert session.connected  # an error answer is no lost connection
        finally:
            await session.close()


@pytest.mark.asyncio
async def test_a_command_that_gets_no_answer_times_out(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "hang=stop") as qemu:
        session = QmpSession("vm", lambda *_: None)
        await session.connect(str(qemu.qmp_path))
        try:
            started = time.monotonic()
            with pytest.raises(Timeout) as timed_out:
                await session.execute("stop", timeout=SHORT)
            assert SHORT <= time.monotonic() - started < SHORT + 5
            assert "QMP stop on vm" in str(timed_out.value)
        finally:
            await session.close()


@pytest.mark.asyncio
async def test_connect_to_a_peer_that_never_greets_times_out_and_leaves_nothing(short_tmp: Path) -> None:
    """A listening socket nobody serves: the kernel completes the connect, no greeting
    ever comes (what a wedged QEMU, or a second client of a busy monitor, sees)."""
    path = short_tmp / "silent"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(1)
        session = QmpSession("vm", lambda *_: None)
        with pytest.raises(Timeout):
            await session.connect(str(path), timeout=SHORT)
        assert not session.connected
        assert other_tasks() == set()
        await session.close()  # harmless after a failed connect


@pytest.mark.asyncio
async def test_connect_to_nothing_is_not_connected(short_tmp: Path) -> None:
    session = QmpSession("vm", lambda *_: None)
    with pytest.raises(NotConnected):
        await session.connect(str(short_tmp / "nothing-here"), timeout=SHORT)


@pytest.mark.asyncio
async def test_a_second_session_waits_for_the_first_then_connects(short_tmp: Path) -> None:
    """QEMU's monitor serves one client: the daemon reconnects (after a restart, or a drop)
    only once the old session is gone."""
    with fake_qemu_process(short_tmp) as qemu:
        first = QmpSession("vm", lambda *_: None)
        await first.connect(str(qemu.qmp_path))
        second = QmpSession("vm", lambda *_: None)
        with pytest.raises(Timeout):
            await second.connect(str(qemu.qmp_path), timeout=SHORT)
        await first.close()
        again = QmpSession("vm", lambda *_: None)
        await again.connect(str(qemu.qmp_path))
        try:
            assert (await again.query_status())["status"] == "prelaunch"
        finally:
            await again.close()


@pytest.mark.asyncio
async def test_a_lost_peer_is_reported_once_and_commands_fail_fast(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp) as qemu:
        seen = Recorder()
        session = QmpSession("vm", seen.on_event, seen.on_disconnect)
        await session.connect(str(qemu.qmp_path))
        try:
            qemu.kill()
            await asyncio.wait_for(seen.disconnected.wait(), 10)
            assert not session.connected
            with pytest.raises(NotConnected):
                await session.execute("query-status")
        finally:
            await session.close()
        assert seen.disconnects == 1


@pytest.mark.asyncio
async def test_a_dropped_connection_interrupts_the_command_in_flight(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "drop=query-status") as qemu:
        seen = Recorder()
        session = QmpSession("vm", seen.on_event, seen.on_disconnect)
        await session.connect(str(qemu.qmp_path))
        try:
            with pytest.raises(NotConnected):
                await session.query_status()
            await asyncio.wait_for(seen.disconnected.wait(), 10)
        finally:
            await session.close()
        assert qemu.process.poll() is None  # only the connection went: the daemon reconnects (test_machine)
