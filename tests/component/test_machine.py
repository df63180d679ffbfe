# SPDX-License-Identifier: LGPL-2.1-or-later
"""One Machine, started and stopped for real in this process, with the fake QEMU
(tests/fakes/fake_qemu.py) standing in for QEMU: fast seam tests beside the real boots of
tests/integration (marked `vm`), which run the same paths with qemu-system-x86_64.

Start: every step that can fail unwinds what the steps before it acquired — no process,
no runtime directory, no fd is left — and the error names the step. Stop: the ACPI
request, the escalation after its deadline, Terminate, Kill; and the outcome recorded.
Everything goes through Machine's public methods.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.component.conftest import SERVE_CONTROL, FakeHost, open_fds, state_of
from tests.support import notify_as_guest, parent_of
from vmspawnd.errors import NotConnected, StartFailed
from vmspawnd.machine import Machine
from vmspawnd.model import MachineState
from vmspawnd.qemu.console import AttachMode
from vmspawnd.settings import Settings

UNIX_NOTIFY = Settings(gui_window=False, notify_transport="unix", serve_control=SERVE_CONTROL)


async def receive_until(sock: socket.socket, end: bytes) -> bytes:
    """What a console client reads up to `end`, awaited on this loop (the hub runs on it too)."""
    sock.setblocking(False)
    data = b""
    async with asyncio.timeout(10):
        while not data.endswith(end):
            data += await asyncio.get_running_loop().sock_recv(sock, 4096)
    return data


async def ended(machine: Machine, timeout: float = 30) -> None:
    await machine.wait_for(lambda: machine.record.state.is_final, timeout, "the end of the VM")


# --- a start that succeeds, and the stops ------------------------------------------------------


@pytest.mark.asyncio
async def test_start_runs_qemu_under_its_reaper_and_power_off_ends_it(fake_host: FakeHost) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm"))
    await machine.start()
    rec = machine.record
    assert rec.state is MachineState.READY and rec.ready  # no vsock: running counts as ready
    assert rec.qemu is not None and rec.reaper is not None
    assert parent_of(rec.qemu.pid) == rec.reaper.pid  # QEMU is the reaper's child, not ours
    assert await machine.query_status() == {"status": "running", "singlestep": False, "running": True}
    assert Path(rec.qmp_address).is_socket() and Path(rec.control_address).is_socket()

    await machine.power_off()
    assert state_of(machine) is MachineState.STOPPED
    assert rec.reason == "powered off on request"
    assert rec.exit_code == 0 and rec.exit_signal is None
    assert events.states() == ["starting", "running", "ready", "stopping", "stopped"]
    assert "POWERDOWN" in events.names()
    assert fake_host.processes() == []
    # What outlives QEMU: the record and the logs, not its sockets.
    assert not Path(machine.directory / "qmp").exists() and not Path(machine.directory / "control").exists()
    assert (machine.directory / "state.json").exists()
    assert rec.qmp_address == rec.control_address == ""


@pytest.mark.asyncio
async def test_power_off_escalates_to_quit_when_the_guest_ignores_the_button(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", "powerdown=ignore"))
    await machine.start()
    started = time.monotonic()
    await machine.power_off(deadline=0.2)
    assert time.monotonic() - started >= 0.2
    assert machine.record.state is MachineState.STOPPED
    assert machine.record.reason == "terminated: the guest did not power off within 0.2s"
    assert machine.record.exit_code == 0  # QMP quit sufficed: no signal was needed
    assert "terminating on signal" not in machine.record.stderr_tail


@pytest.mark.asyncio
async def test_request_power_off_returns_at_once_and_asking_again_changes_nothing(fake_host: FakeHost) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm", "powerdown=ignore"))
    await machine.start()
    await machine.request_power_off(deadline=0.2)
    assert machine.record.state is MachineState.STOPPING
    await machine.request_power_off(deadline=60)  # no second button press, no new deadline
    await ended(machine)
    assert events.names().count("POWERDOWN") == 1
    assert machine.record.reason == "terminated: the guest did not power off within 0.2s"


@pytest.mark.asyncio
async def test_terminate_quits_qemu(fake_host: FakeHost) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm"))
    await machine.start()
    await machine.terminate()
    assert machine.record.state is MachineState.STOPPED
    assert machine.record.reason == "terminated on request"
    assert machine.record.exit_code == 0
    assert "POWERDOWN" not in events.names()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_terminate_climbs_the_whole_ladder_for_a_wedged_qemu(fake_host: FakeHost) -> None:
    """QMP quit gets no answer and SIGTERM is ignored: SIGKILL after the daemon's real
    graces (QUIT_GRACE twice, then TERM_GRACE), so this is in the slow tier."""
    machine, _events = fake_host.new_machine(fake_host.spec("vm", "hang=quit", "sigterm=ignore"))
    await machine.start()
    await machine.terminate()
    assert machine.record.state is MachineState.STOPPED
    assert machine.record.reason == "terminated on request"
    assert machine.record.exit_signal == signal.SIGKILL


@pytest.mark.slow
@pytest.mark.asyncio
async def test_terminate_sends_sigterm_when_quit_gets_no_answer(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", "hang=quit"))
    await machine.start()
    await machine.terminate()
    assert machine.record.state is MachineState.STOPPED
    assert machine.record.exit_code == 0  # QEMU ends on SIGTERM with status 0 ...
    assert f"terminating on signal 15 from pid {os.getpid()}" in machine.record.stderr_tail  # ... and says why
    assert machine.record.reason == "terminated on request"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("signo", "state", "reason", "exit_code", "exit_signal"),
    [
        (signal.SIGKILL, MachineState.STOPPED, "killed with SIGKILL on request", None, signal.SIGKILL),
        (signal.SIGTERM, MachineState.STOPPED, "terminated with SIGTERM on request", 0, None),
    ],
)
async def test_kill_records_the_signal(
    fake_host: FakeHost, signo: int, state: MachineState, reason: str, exit_code: int | None, exit_signal: int | None
) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm"))
    await machine.start()
    machine.kill(signo)
    await ended(machine)
    rec = machine.record
    assert (rec.state, rec.reason, rec.exit_code, rec.exit_signal) == (state, reason, exit_code, exit_signal)


@pytest.mark.asyncio
async def test_a_qemu_crash_is_a_failure_with_its_signal(fake_host: FakeHost) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm", "crash=system_reset:SIGSEGV"))
    await machine.start()
    with pytest.raises(NotConnected):
        await machine.reboot()  # QEMU dies on the command: the call cannot get an answer
    await ended(machine)
    assert machine.record.state is MachineState.FAILED
    assert machine.record.reason == "QEMU was killed by SIGSEGV"
    assert machine.record.exit_signal == signal.SIGSEGV
    assert events.states()[-1] == "failed"
    assert fake_host.processes() == []


@pytest.mark.asyncio
async def test_a_qemu_that_quits_on_its_own_is_recorded(fake_host: FakeHost) -> None:
    """The guest powers off by itself (here: QMP quit from elsewhere ends QEMU): the
    supervisor notices without any request and records the end."""
    machine, _events = fake_host.new_machine(fake_host.spec("vm"))
    await machine.start()
    await machine.qmp_execute("quit")
    await ended(machine)
    assert machine.record.state is MachineState.STOPPED
    assert machine.record.exit_code == 0


# --- running --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pause_resume_and_reboot(fake_host: FakeHost) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm"))
    await machine.start()
    try:
        await machine.pause()
        assert machine.record.paused and (await machine.query_status())["status"] == "paused"
        await machine.resume()
        assert not machine.record.paused and (await machine.query_status())["status"] == "running"
        await machine.reboot()
        assert await events.wait_for("RESET") == {"guest": False, "reason": "host-qmp-system-reset"}
        assert machine.record.state is MachineState.READY  # a reset is not a stop
    finally:
        await machine.terminate()


@pytest.mark.asyncio
async def test_qmp_comes_back_after_the_connection_drops(fake_host: FakeHost) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm", "drop=query-status"))
    await machine.start()
    try:
        with pytest.raises(NotConnected):
            await machine.query_status()
        assert await events.wait_for("QmpReconnected") == {"status": "running"}
        assert "QmpDisconnected" in events.names()
        assert (await machine.query_status())["status"] == "running"
        assert machine.record.state is MachineState.READY
    finally:
        await machine.terminate()
    assert machine.record.reason == "terminated on request"


@pytest.mark.asyncio
async def test_readiness_and_status_come_from_the_guest(fake_host: FakeHost) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm"), settings=UNIX_NOTIFY)
    await machine.start()
    try:
        assert machine.record.state is MachineState.RUNNING and not machine.record.ready
        notify_as_guest(machine.record.notify_address, b"STATUS=booting\n")
        notify_as_guest(machine.record.notify_address, b"READY=1\nSTATUS=up\nEXIT_STATUS=3\n")
        await machine.wait_ready(10)
        assert state_of(machine) is MachineState.READY
        assert (machine.record.status_text, machine.record.exit_status) == ("up", 3)
        assert [data for name, data in events.seen if name == "Notify"] == [
            {"STATUS": "booting"},
            {"READY": "1", "STATUS": "up", "EXIT_STATUS": "3"},
        ]
    finally:
        await machine.terminate()


@pytest.mark.asyncio
async def test_console_echo_and_history(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", console="interactive"))
    await machine.start()
    banner = b"fake-qemu: guest running\r\n"  # written by the guest as it started
    try:
        assert machine.console is not None
        writer = machine.console.open(AttachMode.INTERACTIVE)
        watcher = machine.console.open(AttachMode.READ_ONLY)
        with writer, watcher:
            writer.sendall(b"typed")
            # The guest echoes to every client; the banner comes first if the hub had not
            # passed it on yet when they attached.
            assert await receive_until(watcher, b"typed") in (b"typed", banner + b"typed")
            assert await receive_until(writer, b"typed") in (b"typed", banner + b"typed")
            late = machine.console.open(AttachMode.READ_ONLY, history=4096)
            with late:
                assert await receive_until(late, b"typed") == banner + b"typed"  # all of it, once
    finally:
        await machine.terminate()
    assert Path(machine.record.console_log).read_bytes() == banner + b"typed"


@pytest.mark.asyncio
async def test_screenshot_is_an_open_file_and_leaves_nothing_behind(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", console="gui"))
    await machine.start()
    try:
        before = sorted(p.name for p in machine.directory.iterdir())
        fd = await machine.screenshot("ppm")
        with os.fdopen(fd, "rb") as image:
            assert image.read() == b"P6\n1 1\n255\n\0\0\0"  # what the fake's screendump draws
        assert sorted(p.name for p in machine.directory.iterdir()) == before
    finally:
        await machine.terminate()


# --- a start that fails: each step unwinds what came before it -----------------------------------


def plant_file(name: str) -> Callable[[Path], None]:
    """Something that is not a socket where the daemon binds one: the bind fails."""

    def plant(directory: Path) -> None:
        directory.mkdir(mode=0o700)
        (directory / name).write_text("planted\n")

    return plant


def plant_directory(name: str) -> Callable[[Path], None]:
    def plant(directory: Path) -> None:
        directory.mkdir(mode=0o700)
        (directory / name).mkdir()

    return plant


def no_plant(_directory: Path) -> None:
    pass


# The console step has no case of its own: its connect cannot fail while QEMU runs (the
# reaper holds the listening socket too), and the register and cont cases unwind the hub.
START_FAILURES = [
    # (step, faults, spec fields, settings, what to plant in the VM directory, message part)
    pytest.param("qmp", ["exit=1"], {}, None, no_plant, "QEMU exited with status 1", id="qmp-exit"),
    pytest.param("notify", [], {}, UNIX_NOTIFY, plant_file("notify"), "refusing to bind", id="notify"),
    pytest.param("sockets", [], {}, None, plant_file("qmp"), "refusing to bind", id="sockets"),
    pytest.param("qemu", [], {}, None, plant_directory("qemu.log"), "Is a directory", id="qemu"),
    pytest.param("control", [], {}, None, plant_file("control"), "refusing to bind", id="control"),
    pytest.param("register", [], {"register": True}, None, no_plant, "systemd-machined", id="register"),
    pytest.param("cont", ["crash=cont:SIGSEGV"], {}, None, no_plant, "QEMU was killed by SIGSEGV", id="cont-crash"),
    # QEMU refuses `cont` and runs on: start gives it 2 s to exit first (it usually is exiting).
    pytest.param("cont", ["error=cont"], {}, None, no_plant, "fake failure of cont", id="cont-error", marks=pytest.mark.slow),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("step", "faults", "fields", "settings", "plant", "message"), START_FAILURES)
async def test_a_failed_start_unwinds_everything(
    fake_host: FakeHost,
    step: str,
    faults: list[str],
    fields: dict[str, object],
    settings: Settings | None,
    plant: Callable[[Path], None],
    message: str,
) -> None:
    machine, events = fake_host.new_machine(fake_host.spec("vm", *faults, **fields), *([settings] if settings else []))
    plant(machine.directory)
    fds = open_fds()
    with pytest.raises(StartFailed) as failed:
        await machine.start()
    assert failed.value.step == step
    assert message in failed.value.message
    assert not machine.directory.exists()
    assert fake_host.processes() == []
    assert open_fds() == fds
    assert events.states() == ["starting"]  # it never ran


@pytest.mark.asyncio
async def test_stderr_of_a_qemu_that_refuses_to_start_reaches_the_error(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", "exit=1"))
    with pytest.raises(StartFailed) as failed:
        await machine.start()
    assert "fake QEMU exits with status 1 as asked" in failed.value.stderr_tail


@pytest.mark.asyncio
async def test_no_qemu_in_path_fails_at_resolve(fake_host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_host.root / "empty"))
    machine, _events = fake_host.new_machine(fake_host.spec("vm"))
    with pytest.raises(StartFailed) as failed:
        await machine.start()
    assert failed.value.step == "resolve"
    assert "no QEMU binary in $PATH" in failed.value.message
    assert not machine.directory.exists()


@pytest.mark.asyncio
async def test_a_helper_that_cannot_start_fails_at_helpers(fake_host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tpm=yes with swtpm present but swtpm_setup missing (a PATH of our own has just the
    fake QEMU and a dummy swtpm)."""
    swtpm = fake_host.bin_dir / "swtpm"
    swtpm.write_text("#!/bin/sh\nexit 1\n")
    swtpm.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_host.bin_dir))
    machine, _events = fake_host.new_machine(fake_host.spec("vm", tpm=True))
    with pytest.raises(StartFailed) as failed:
        await machine.start()
    assert (failed.value.step, failed.value.message) == ("helpers", "--tpm=yes but swtpm_setup is not installed")
    assert not machine.directory.exists()


@pytest.mark.skipif(not all(map(os.path.exists, ("/usr/bin/swtpm", "/usr/bin/swtpm_setup"))), reason="needs swtpm")
@pytest.mark.asyncio
async def test_helpers_that_started_are_stopped_when_a_later_step_fails(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", "exit=1", tpm=True))
    with pytest.raises(StartFailed) as failed:
        await machine.start()
    assert failed.value.step == "qmp"
    swtpm = machine.record.helpers["swtpm"]  # it did run: the record names it
    assert not Path(f"/proc/{swtpm.pid}").exists()  # stopped and reaped
    assert not machine.directory.exists()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_qemu_that_never_greets_fails_at_qmp_after_the_connect_timeout(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", "hang=greeting"))
    with pytest.raises(StartFailed) as failed:
        await machine.start()
    assert failed.value.step == "qmp" and "timed out" in failed.value.message
    assert fake_host.processes() == [] and not machine.directory.exists()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_qemu_that_does_not_answer_cont_fails_at_cont(fake_host: FakeHost) -> None:
    machine, _events = fake_host.new_machine(fake_host.spec("vm", "hang=cont"))
    with pytest.raises(StartFailed) as failed:
        await machine.start()
    assert failed.value.step == "cont" and "timed out" in failed.value.message
    assert fake_host.processes() == [] and not machine.directory.exists()
