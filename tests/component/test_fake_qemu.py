# SPDX-License-Identifier: LGPL-2.1-or-later
"""The fake QEMU keeps up with the real one: the same QMP conversation, run against both.

The fake (tests/fakes/fake_qemu.py) stands in for QEMU only in the component tests; these
tests hold it to what the real QEMU does on the wire, so the component tests do not pass
against behaviour QEMU does not have. The `real` cases start qemu-system-x86_64 with no
machine (`-machine none`: no guest, no firmware) and are marked `qemu` (scripts/test runs
them, a bare `pytest` does not). The fault markers are the fake's own and are tested on
the fake alone, at the end.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeQemuProcess, fake_qemu_process

REAL_QEMU = shutil.which("qemu-system-x86_64")
REAL_PROGRAM = [str(REAL_QEMU), "-machine", "none", "-nodefaults", "-nographic", "-display", "none"]
NOT_GREETED_WITHIN = 0.5  # a bound for an absence: QEMU greets within milliseconds when it does

implementations = pytest.mark.parametrize(
    "program",
    [
        pytest.param(None, id="fake"),
        pytest.param(
            REAL_PROGRAM,
            id="real",
            marks=[
                pytest.mark.qemu,
                pytest.mark.skipif(REAL_QEMU is None, reason="qemu-system-x86_64 not installed"),
            ],
        ),
    ],
)


class Qmp:
    """A plain blocking QMP client: the wire as it is, no library in between."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, object]] = []

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def receive(self) -> dict[str, object]:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP closed")
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    def greeted(self, timeout: float) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def execute(self, command: str, **arguments: object) -> dict[str, object]:
        """Send one command (newline-free, as qemu.qmp does) and return its reply; events
        that arrive first are kept in `events`."""
        request: dict[str, object] = {"execute": command, "id": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode())
        while True:
            message = self.receive()
            if "event" in message:
                self.events.append(message)
            else:
                assert message.get("id") == command, message
                return message

    def event(self, name: str) -> dict[str, object]:
        """The next `name` event (already received, or read now)."""
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(index)
            self.events.append(self.receive())


@pytest.fixture
def negotiated(short_tmp: Path, program: list[str] | None) -> Iterator[tuple[FakeQemuProcess, Qmp]]:
    with fake_qemu_process(short_tmp, program=program) as qemu:
        client = Qmp(qemu.qmp_path)
        client.receive()
        assert client.execute("qmp_capabilities", enable=["oob"]) == {"return": {}, "id": "qmp_capabilities"}
        try:
            yield qemu, client
        finally:
            client.close()


@implementations
def test_greeting_and_negotiation(short_tmp: Path, program: list[str] | None) -> None:
    with fake_qemu_process(short_tmp, program=program) as qemu:
        client = Qmp(qemu.qmp_path)
        try:
            greeting = client.receive()["QMP"]
            assert isinstance(greeting, dict)
            assert {"major", "minor", "micro"} <= set(greeting["version"]["qemu"])
            assert "oob" in greeting["capabilities"]
            refused = client.execute("query-status")
            assert refused["error"]["class"] == "CommandNotFound"  # type: ignore[index]
            assert client.execute("qmp_capabilities", enable=["oob"])["return"] == {}
            assert "error" in client.execute("qmp_capabilities")  # negotiated once only
        finally:
            client.close()


@implementations
def test_run_state_and_its_events(negotiated: tuple[FakeQemuProcess, Qmp]) -> None:
    _qemu, qmp = negotiated
    assert qmp.execute("query-status")["return"] == {"status": "prelaunch", "singlestep": False, "running": False}
    assert qmp.execute("cont")["return"] == {}
    assert "data" not in qmp.event("RESUME")
    assert qmp.execute("query-status")["return"]["running"] is True  # type: ignore[index]
    qmp.execute("stop")
    qmp.event("STOP")
    assert qmp.execute("query-status")["return"]["status"] == "paused"  # type: ignore[index]
    qmp.execute("cont")
    qmp.event("RESUME")
    qmp.execute("system_reset")
    assert qmp.event("RESET")["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert qmp.execute("query-status")["return"]["status"] == "running"  # type: ignore[index]
    assert qmp.execute("no-such-command")["error"]["class"] == "CommandNotFound"  # type: ignore[index]


@implementations
def test_quit_ends_the_process_with_status_0(negotiated: tuple[FakeQemuProcess, Qmp]) -> None:
    qemu, qmp = negotiated
    assert qmp.execute("quit")["return"] == {}
    assert qmp.event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert qemu.process.wait(timeout=30) == 0


@implementations
def test_sigterm_names_its_sender_and_exits_0(negotiated: tuple[FakeQemuProcess, Qmp]) -> None:
    qemu, qmp = negotiated
    assert qemu.kill(signal.SIGTERM) == 0
    assert qmp.event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-signal"}
    assert f"terminating on signal 15 from pid {os.getpid()} (" in qemu.stderr


@implementations
def test_one_client_at_a_time(short_tmp: Path, program: list[str] | None) -> None:
    """The monitor greets a second client only once the first has gone: what the daemon's
    QMP reconnect and the reaper's own QMP fallback rely on."""
    with fake_qemu_process(short_tmp, program=program) as qemu:
        first = Qmp(qemu.qmp_path)
        first.receive()
        second = Qmp(qemu.qmp_path)
        try:
            assert not second.greeted(NOT_GREETED_WITHIN)
            first.close()
            assert "QMP" in second.receive()
        finally:
            second.close()


# --- the fake's faults ---------------------------------------------------------------------


def test_fault_exit_at_start(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "exit=3") as qemu:
        assert qemu.process.wait(timeout=30) == 3
        assert "exits with status 3" in qemu.stderr


def test_fault_hang_at_a_command_keeps_the_process_and_the_connection(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "hang=stop") as qemu:
        qmp = Qmp(qemu.qmp_path)
        try:
            qmp.receive()
            qmp.execute("qmp_capabilities")
            qmp.sock.sendall(b'{"execute": "stop"}')
            assert not qmp.greeted(NOT_GREETED_WITHIN)  # no reply comes
            assert qemu.process.poll() is None
        finally:
            qmp.close()


def test_fault_crash_on_a_command(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "crash=cont:SIGSEGV") as qemu:
        qmp = Qmp(qemu.qmp_path)
        try:
            qmp.receive()
            qmp.execute("qmp_capabilities")
            qmp.sock.sendall(b'{"execute": "cont"}')
            assert qemu.process.wait(timeout=30) == -signal.SIGSEGV
        finally:
            qmp.close()


def test_fault_drop_closes_the_connection_once(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "drop=query-status") as qemu:
        qmp = Qmp(qemu.qmp_path)
        qmp.receive()
        qmp.execute("qmp_capabilities")
        qmp.sock.sendall(b'{"execute": "query-status"}')
        with pytest.raises(EOFError):
            qmp.receive()
        qmp.close()
        again = Qmp(qemu.qmp_path)
        try:
            again.receive()
            again.execute("qmp_capabilities")
            assert again.execute("query-status")["return"]["status"] == "prelaunch"  # type: ignore[index]
        finally:
            again.close()


def test_fault_sigterm_ignored(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, "sigterm=ignore") as qemu:
        qmp = Qmp(qemu.qmp_path)  # a round trip: the fake is past its start-up
        try:
            qmp.receive()
            qemu.process.send_signal(signal.SIGTERM)
            assert qmp.execute("qmp_capabilities")["return"] == {}  # still serving
            assert qemu.kill(signal.SIGKILL) == -signal.SIGKILL
        finally:
            qmp.close()


def test_console_logs_and_echoes(short_tmp: Path) -> None:
    with fake_qemu_process(short_tmp, console=True) as qemu:
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.settimeout(30)
        qmp = Qmp(qemu.qmp_path)
        try:
            console.connect(str(qemu.console_path))
            qmp.receive()
            qmp.execute("qmp_capabilities")
            qmp.execute("cont")
            assert console.recv(4096) == b"fake-qemu: guest running\r\n"
            console.sendall(b"echo me")
            assert console.recv(4096) == b"echo me"
            qmp.execute("quit")
            assert qemu.process.wait(timeout=30) == 0
            assert qemu.console_log.read_bytes() == b"fake-qemu: guest running\r\necho me"
        finally:
            console.close()
            qmp.close()
