# SPDX-License-Identifier: LGPL-2.1-or-later
"""Registration and scope units against a real private dbus-daemon with stand-in
machine1/systemd1 services, and a stand-in io.systemd.Machine Varlink server.

The assertions are on what the stand-ins received: method names, signatures and
arguments as systemd defines them (docs/reference/systemd-vmspawn.md §5.1, §5.2).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

import pytest
import pytest_asyncio

from tests.guest.build import Guest
from tests.standins import machined_varlink
from tests.standins.dbus import PrivateBus, Services, private_system_bus, start_services
from tests.support import make_runtime_dir, start_daemon, stop_daemon
from vmspawnd.errors import StartFailed
from vmspawnd.host.machined import RegistrationInfo
from vmspawnd.host.registration import register_machine
from vmspawnd.host.scope import unit_object_path

UUID = "0123456789abcdef0123456789abcdef"
MIB = 1024 * 1024
T = TypeVar("T")


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with private_system_bus() as b:
        yield b


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process to stand in for QEMU (a leader with a real pid and pidfd)."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait()


@pytest_asyncio.fixture
async def services(bus: PrivateBus) -> AsyncIterator[Services]:
    s = await start_services(bus.address)
    yield s
    await s.close()


def env_for(bus: PrivateBus | None, machined: Path | None) -> dict[str, str]:
    env = {"DBUS_SYSTEM_BUS_ADDRESS": bus.address if bus else "unix:path=/nonexistent/bus"}
    env["VMSPAWND_MACHINED_ADDRESS"] = str(machined) if machined else "/nonexistent/io.systemd.Machine"
    return env


@pytest.fixture(autouse=True)
def _bus_env(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """dbus-fast reads DBUS_SYSTEM_BUS_ADDRESS from the process environment."""
    if "bus" in request.fixturenames:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", request.getfixturevalue("bus").address)
    else:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")


class InfoFields(TypedDict, total=False):
    """The RegistrationInfo fields a test sets beyond name, uuid and leader."""

    root_directory: str | None
    vsock_cid: int | None
    ssh_private_key_path: str | None
    control_address: str | None


def info(pid: int, **kwargs: Unpack[InfoFields]) -> RegistrationInfo:
    return RegistrationInfo(name="alpha", uuid=UUID, leader_pid=pid, **kwargs)


@pytest.mark.asyncio
async def test_varlink_register_261_with_control_address(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    iface, server = await machined_varlink.serve(tmp_path / "machine")
    try:
        reg = await register_machine(
            info(sleeper.pid, vsock_cid=42, ssh_private_key_path="/k", control_address="/run/x/control"),
            register=None,
            is_root=True,
            systemd_booted=False,
            environ=env_for(None, tmp_path / "machine"),
        )
        assert reg.varlink_address == str(tmp_path / "machine")
        [(member, params)] = iface.calls
        assert member == "Register"
        leader = params.pop("leaderProcessId")
        assert leader["pid"] == sleeper.pid
        assert params == {
            "name": "alpha",
            "id": UUID,
            "service": "vmspawnd",
            "class": "vm",
            "vSockCid": 42,
            "sshAddress": "vsock/42",
            "sshPrivateKeyPath": "/k",
            "controlAddress": "/run/x/control",
        }
        await reg.close()
        assert iface.calls[-1] == ("Unregister", {"name": "alpha"})
        assert iface.machines == {}
    finally:
        server.close()


@pytest.mark.asyncio
async def test_varlink_register_before_261_retries_without_control_address(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    iface, server = await machined_varlink.serve(tmp_path / "machine", legacy=True)
    try:
        reg = await register_machine(
            info(sleeper.pid, control_address="/run/x/control"),
            register=True,
            is_root=False,
            systemd_booted=False,
            environ=env_for(None, tmp_path / "machine"),
        )
        assert [c[0] for c in iface.calls] == ["Register"]  # the refused call never reached the method
        assert "controlAddress" not in iface.calls[0][1]
        assert "alpha" in iface.machines
        await reg.close()
        assert iface.machines == {}
    finally:
        server.close()


@pytest.mark.asyncio
async def test_machine_exists_fails_required_registration(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    iface, server = await machined_varlink.serve(tmp_path / "machine")
    iface.machines["alpha"] = {}
    try:
        env = env_for(None, tmp_path / "machine")
        with pytest.raises(StartFailed) as failure:
            await register_machine(info(sleeper.pid), register=True, is_root=False, systemd_booted=False, environ=env)
        assert failure.value.step == "register"
        assert "io.systemd.Machine.MachineExists" in failure.value.message
        # auto: logged, not fatal
        reg = await register_machine(info(sleeper.pid), register=None, is_root=False, systemd_booted=False, environ=env)
        assert not reg.registered
    finally:
        server.close()


@pytest.mark.asyncio
async def test_absent_machined_auto_is_quiet_and_yes_fails() -> None:
    env = env_for(None, None)
    reg = await register_machine(info(os.getpid()), register=None, is_root=True, systemd_booted=False, environ=env)
    assert not reg.registered and reg.scope_unit is None
    await reg.close()
    with pytest.raises(StartFailed) as failure:
        await register_machine(info(os.getpid()), register=True, is_root=True, systemd_booted=False, environ=env)
    assert failure.value.step == "register"
    # systemd manages the system but its bus is unreachable: the scope step fails clearly
    with pytest.raises(StartFailed) as failure:
        await register_machine(info(os.getpid()), register=False, is_root=True, systemd_booted=True, environ=env)
    assert failure.value.step == "scope"


@pytest.mark.asyncio
async def test_dbus_fallback_register_machine(bus: PrivateBus, services: Services, sleeper: subprocess.Popen[bytes]) -> None:
    reg = await register_machine(
        info(sleeper.pid, root_directory="/srv/tree"),
        register=True,
        is_root=True,
        systemd_booted=False,
        environ=env_for(bus, None),
    )
    assert reg.dbus_registered
    [call] = services.calls
    assert (call.member, call.signature) == ("RegisterMachine", "sayssus")
    assert call.args == ["alpha", bytes.fromhex(UUID), "vmspawnd", "vm", sleeper.pid, "/srv/tree"]
    await reg.close()
    assert (services.calls[-1].member, services.calls[-1].args) == ("UnregisterMachine", ["alpha"])


@pytest.mark.asyncio
async def test_scope_with_properties_and_teardown(bus: PrivateBus, services: Services, sleeper: subprocess.Popen[bytes]) -> None:
    helper = subprocess.Popen(["sleep", "600"])  # noqa: ASYNC220 - a stand-in helper, started at once
    try:
        reg = await register_machine(
            info(sleeper.pid),
            register=False,
            is_root=True,
            systemd_booted=True,
            environ=env_for(bus, None),
            slice_name="vms",
            properties=["MemoryMax=1G", "CPUQuota=50%", "DeviceAllow=/dev/kvm rw"],
            pids=[sleeper.pid, helper.pid],
        )
        assert reg.scope_unit == "alpha.scope"
        starts = [c for c in services.calls if c.member == "StartTransientUnit"]
        # the stand-in refuses PIDFDs like a manager without pidfd support: retried with PIDs
        assert len(starts) == 2
        first, second = starts
        assert first.signature == "ssa(sv)a(sa(sv))"
        assert "PIDFDs" in [p[0] for p in first.args[2]]
        name, mode, props, aux = second.args
        assert (name, mode, aux) == ("alpha.scope", "fail", [])
        props = {p[0]: p[1] for p in props}
        assert props["PIDs"] == ("au", [sleeper.pid, helper.pid])
        assert props["Description"] == ("s", "Virtual Machine alpha")
        assert props["CollectMode"] == ("s", "inactive-or-failed")
        assert props["AddRef"] == ("b", True)
        assert props["Slice"] == ("s", "vms.slice")
        assert props["Controller"][0] == "s" and props["Controller"][1].startswith(":")
        assert props["MemoryMax"] == ("t", 1024**3)
        assert props["CPUQuotaPerSecUSec"] == ("t", 500000)
        assert props["DeviceAllow"] == ("a(ss)", [["/dev/kvm", "rw"]])
        await reg.close()
        tail = [(c.member, c.signature, c.args) for c in services.calls[-3:]]
        assert tail == [
            ("AbandonScope", "s", ["alpha.scope"]),
            ("KillUnit", "ssi", ["alpha.scope", "all", int(signal.SIGKILL)]),
            ("UnrefUnit", "s", ["alpha.scope"]),
        ]
    finally:
        helper.kill()
        helper.wait()


@pytest.mark.asyncio
async def test_scope_with_pidfds_accepted(bus: PrivateBus, sleeper: subprocess.Popen[bytes]) -> None:
    services = await start_services(bus.address, accept_pidfds=True)
    try:
        reg = await register_machine(
            info(sleeper.pid), register=False, is_root=True, systemd_booted=True, environ=env_for(bus, None)
        )
        [start] = [c for c in services.calls if c.member == "StartTransientUnit"]
        props = {p[0]: p[1] for p in start.args[2]}
        assert props["PIDFDs"][0] == "ah" and "PIDs" not in props
        await reg.close()
    finally:
        await services.close()


@pytest.mark.asyncio
async def test_failed_scope_job_fails_start(bus: PrivateBus, sleeper: subprocess.Popen[bytes]) -> None:
    services = await start_services(bus.address, job_result="failed")
    try:
        with pytest.raises(StartFailed) as failure:
            await register_machine(
                info(sleeper.pid), register=False, is_root=True, systemd_booted=True, environ=env_for(bus, None)
            )
        assert failure.value.step == "scope" and "failed" in failure.value.message
        assert services.members()[-3:] == ["AbandonScope", "KillUnit", "UnrefUnit"]  # undone
    finally:
        await services.close()


@pytest.mark.asyncio
async def test_request_stop_calls_back(bus: PrivateBus, services: Services, sleeper: subprocess.Popen[bytes]) -> None:
    stopped = asyncio.Event()

    async def on_stop() -> None:
        stopped.set()

    reg = await register_machine(
        info(sleeper.pid),
        register=False,
        is_root=True,
        systemd_booted=True,
        environ=env_for(bus, None),
        on_request_stop=on_stop,
    )
    assert services.systemd1 is not None
    services.systemd1.request_stop("alpha.scope", unit_object_path("alpha.scope"))
    async with asyncio.timeout(10):
        await stopped.wait()
    await reg.close()


@pytest.mark.asyncio
async def test_root_varlink_registration_creates_our_scope_first(
    tmp_path: Path, bus: PrivateBus, services: Services, sleeper: subprocess.Popen[bytes]
) -> None:
    """root + registering ⇒ our scope with every process first, then Register without
    allocateUnit: machined's own scope would hold only the leader (a deviation from 258+)."""
    iface, server = await machined_varlink.serve(tmp_path / "machine")
    try:
        reg = await register_machine(
            info(sleeper.pid),
            register=None,
            is_root=True,
            systemd_booted=True,
            environ=env_for(bus, tmp_path / "machine"),
            pids=[sleeper.pid, os.getpid()],
        )
        assert "allocateUnit" not in iface.calls[0][1]
        assert reg.scope_unit == reg.unit == "alpha.scope"
        start = [c for c in services.calls if c.member == "StartTransientUnit"][-1]
        props = dict(start.args[2])
        assert props["PIDs"][1] == [sleeper.pid, os.getpid()]
        await reg.close()
    finally:
        server.close()


@pytest.mark.asyncio
async def test_keep_unit_joins_the_callers_unit_and_registers(
    tmp_path: Path, bus: PrivateBus, services: Services, sleeper: subprocess.Popen[bytes]
) -> None:
    iface, server = await machined_varlink.serve(tmp_path / "machine")
    try:
        reg = await register_machine(
            info(sleeper.pid),
            register=None,
            keep_unit=True,
            caller_unit="client.service",
            is_root=True,
            systemd_booted=True,
            environ=env_for(bus, tmp_path / "machine"),
            pids=[sleeper.pid],
        )
        assert "allocateUnit" not in iface.calls[0][1]
        assert "StartTransientUnit" not in services.members()
        attach = [c for c in services.calls if c.member == "AttachProcessesToUnit"]
        assert [c.args for c in attach] == [["client.service", "", [sleeper.pid]]]
        assert reg.unit == "client.service" and reg.scope_unit is None
        await reg.close()
        assert "KillUnit" not in services.members()  # never the caller's unit
    finally:
        server.close()


@pytest.mark.asyncio
async def test_keep_unit_without_a_caller_unit_fails_the_start(bus: PrivateBus, sleeper: subprocess.Popen[bytes]) -> None:
    with pytest.raises(StartFailed) as failed:
        await register_machine(
            info(sleeper.pid),
            register=None,
            keep_unit=True,
            caller_unit=None,
            is_root=True,
            systemd_booted=True,
            environ=env_for(bus, None),
        )
    assert failed.value.step == "keep-unit"


@pytest.mark.asyncio
async def test_dbus_fallback_creates_scope_then_registers(
    bus: PrivateBus, services: Services, sleeper: subprocess.Popen[bytes]
) -> None:
    """Without machined's Varlink socket machined cannot allocate: our scope first, then RegisterMachine."""
    reg = await register_machine(info(sleeper.pid), register=None, is_root=True, systemd_booted=True, environ=env_for(bus, None))
    assert services.members() == ["StartTransientUnit", "StartTransientUnit", "RegisterMachine"]
    await reg.close()
    assert services.members()[3:] == ["UnregisterMachine", "AbandonScope", "KillUnit", "UnrefUnit"]


# --- end to end through the daemon ---------------------------------------------------------


class LoopThread:
    """An event loop in a thread, for stand-ins serving a daemon that the test drives
    with blocking calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a stand-in's record of calls; the calls arrive from another process."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.mark.vm
def test_daemon_registers_vm_and_unregisters_at_end(guest: Guest, tmp_path: Path, loop_thread: LoopThread) -> None:
    """A real VM is registered with the stand-in machined (Varlink), with its reaper as leader
    and its control socket as controlAddress, and unregistered when it ends."""
    address = tmp_path / "io.systemd.Machine"
    iface, server = loop_thread.run(machined_varlink.serve(address))
    runtime = make_runtime_dir()
    env = dict(os.environ, VMSPAWND_MACHINED_ADDRESS=str(address), VMSPAWND_SYSTEMD_BOOTED="0")
    daemon = start_daemon(runtime, env=env)
    try:
        daemon.call(
            "Spawn",
            {
                "spec": {
                    "name": "registered",
                    "kvm": False,
                    "ram": 256 * MIB,
                    "linux": str(guest.kernel),
                    "initrds": [str(guest.initrd)],
                    "uuid": "01234567-89ab-cdef-0123-456789abcdef",
                }
            },
        )
        machine = daemon.call("Describe", {"name": "registered"})["machine"]
        wait_until(lambda: len(iface.calls) >= 1, 30, "Register")
        member, params = iface.calls[0]
        assert member == "Register"
        assert params["name"] == "registered" and params["class"] == "vm" and params["service"] == "vmspawnd"
        assert params["id"] == "0123456789abcdef0123456789abcdef"
        # The leader is the reaper, which turns machined's signals into power-off/reboot.
        assert params["leaderProcessId"]["pid"] == machine["reaper"]["pid"] != machine["qemu"]["pid"]
        assert params["controlAddress"] == machine["controlAddress"]
        daemon.call("Terminate", {"name": "registered"})
        wait_until(lambda: ("Unregister", {"name": "registered"}) in iface.calls, 30, "Unregister")
        assert iface.machines == {}
    finally:
        stop_daemon(daemon)
        shutil.rmtree(runtime.parent, ignore_errors=True)
        server.close()


@pytest.mark.vm
def test_daemon_scope_request_stop_terminates_vm(guest: Guest, loop_thread: LoopThread) -> None:
    """Where systemd manages the system: the VM gets NAME.scope in the requested slice
    (machined absent: D-Bus registration is tried and skipped), RequestStop ends the VM,
    and the scope is abandoned, killed and unref'd."""
    with private_system_bus() as bus:
        services = loop_thread.run(start_services(bus.address, machine1=False))
        runtime = make_runtime_dir()
        env = dict(
            os.environ,
            DBUS_SYSTEM_BUS_ADDRESS=bus.address,
            VMSPAWND_SYSTEMD_BOOTED="1",
            VMSPAWND_MACHINED_ADDRESS=str(runtime.parent / "absent"),
        )
        daemon = start_daemon(runtime, env=env)
        try:
            daemon.call(
                "Spawn",
                {
                    "spec": {
                        "name": "scoped",
                        "kvm": False,
                        "ram": 256 * MIB,
                        "linux": str(guest.kernel),
                        "initrds": [str(guest.initrd)],
                        "slice": "vms.slice",
                        "properties": ["TasksMax=200"],
                    }
                },
            )
            machine = daemon.call("Describe", {"name": "scoped"})["machine"]
            starts = [c for c in services.calls if c.member == "StartTransientUnit"]
            assert starts and starts[-1].args[0] == "scoped.scope"
            props = {p[0]: p[1] for p in starts[-1].args[2]}
            # Every process of the VM is in its scope: the reaper (leader) and QEMU at least.
            assert {machine["reaper"]["pid"], machine["qemu"]["pid"]} <= set(props["PIDs"][1])
            assert props["Slice"] == ("s", "vms.slice") and props["TasksMax"] == ("t", 200)
            assert services.systemd1 is not None
            systemd1 = services.systemd1
            loop_thread.loop.call_soon_threadsafe(systemd1.request_stop, "scoped.scope", unit_object_path("scoped.scope"))
            wait_until(
                lambda: daemon.call("Describe", {"name": "scoped"})["machine"]["state"] in ("stopped", "failed"),
                60,
                "the VM to stop after RequestStop",
            )
            machine = daemon.call("Describe", {"name": "scoped"})["machine"]
            assert machine["state"] == "stopped" and "terminated" in machine["reason"], machine
            wait_until(lambda: "UnrefUnit" in services.members(), 30, "scope teardown")
            assert services.members()[-3:] == ["AbandonScope", "KillUnit", "UnrefUnit"]
        finally:
            stop_daemon(daemon)
            shutil.rmtree(runtime.parent, ignore_errors=True)
            loop_thread.run(services.close())
