# SPDX-License-Identifier: LGPL-2.1-or-later
"""Lifecycle and readiness: QMP control, io.systemd.MachineInstance, guest notify.

There is no /dev/vhost-vsock here, so the daemon runs with --notify-transport=unix: the
notify listener is an AF_UNIX socket whose address Describe reports. The tests write to it
exactly what a guest's systemd writes (one connection per message, KEY=VALUE lines, EOF) —
the only stand-in in this file; QEMU, the guest and the Varlink clients are real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import varlink.scanner
from vmspawnctl.varlink import Connection, JsonObject, VarlinkError

from tests.guest.build import Guest
from tests.support import MANAGER, Console, Daemon, EventStream, make_runtime_dir, notify_as_guest, start_daemon, stop_daemon

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
DOCS = Path(__file__).resolve().parents[2] / "docs" / "interfaces"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    runtime = make_runtime_dir()
    d = start_daemon(runtime, "--notify-transport=unix")
    try:
        yield d
    finally:
        stop_daemon(d)
        shutil.rmtree(runtime.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(daemon: Daemon, guest: Guest) -> JsonObject:
    """One booted guest (wait mode: acpid and a shell) shared by the module."""
    spec = {
        "name": "life",
        "kvm": False,
        "ram": 256 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    machine: JsonObject = daemon.call("Spawn", {"spec": spec})["machine"]
    with Console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
    return machine


def describe(daemon: Daemon, name: str = "life") -> JsonObject:
    machine: JsonObject = daemon.call("Describe", {"name": name})["machine"]
    return machine


def control(machine: JsonObject) -> Connection:
    return Connection(str(machine["controlAddress"]), timeout=60)


def test_without_ready_the_vm_runs_but_is_not_ready(daemon: Daemon, vm: JsonObject) -> None:
    machine = describe(daemon)
    assert machine["state"] == "running"
    assert machine["ready"] is False
    assert str(machine["notifyAddress"]).startswith("unix:")
    assert machine["readiness"].startswith("guest")
    with pytest.raises(VarlinkError) as info:
        daemon.call("WaitReady", {"name": "life", "timeout": 0.5})
    assert info.value.name == f"{MANAGER}.Timeout"


def test_malformed_and_oversized_messages_change_nothing(daemon: Daemon, vm: JsonObject) -> None:
    address = str(describe(daemon)["notifyAddress"])
    before = describe(daemon)
    with EventStream(daemon, "life") as events:
        notify_as_guest(address, b"READY=1\n" + b"X" * 5000)  # over NOTIFY_BUFFER_MAX
        notify_as_guest(address, b"this line has no equals sign\nREADY=1")
        notify_as_guest(address, b"\xff\xfeREADY=1")
        notify_as_guest(address, b"STATUS=marker after the bad ones")  # proves the bad ones were processed first
        event = events.wait_event("life", "Notify")
    assert event["data"] == {"STATUS": "marker after the bad ones"}
    after = describe(daemon)
    assert after["ready"] is False and after["state"] == before["state"]
    log = daemon.log()
    assert "notify message exceeded 4096 bytes" in log
    assert "malformed notify message dropped" in log


def test_status_ready_and_exit_status_over_notify(daemon: Daemon, vm: JsonObject) -> None:
    address = str(describe(daemon)["notifyAddress"])
    results: dict[str, JsonObject] = {}

    def wait_ready() -> None:
        results["machine"] = daemon.call("WaitReady", {"name": "life", "timeout": 120})["machine"]

    with EventStream(daemon, "life") as events:
        waiter = threading.Thread(target=wait_ready)
        waiter.start()
        notify_as_guest(address, b"STATUS=Reached target multi-user.target\nREADY=1\n")
        ready = events.wait_state("life", "ready")
        waiter.join(timeout=120)
        notify_as_guest(address, b"EXIT_STATUS=3")
        exit_event = events.wait_event("life", "Notify")
    assert ready["data"]["ready"] is True
    assert results["machine"]["state"] == "ready"
    assert exit_event["data"] == {"EXIT_STATUS": "3"}
    machine = describe(daemon)
    assert machine["statusText"] == "Reached target multi-user.target"
    assert machine["exitStatus"] == 3


def test_machine_instance_describe_with_third_party_client(daemon: Daemon, vm: JsonObject) -> None:
    address = describe(daemon)["controlAddress"]
    result = subprocess.run(
        [sys.executable, "-m", "varlink.cli", "call", f"unix:{address}/io.systemd.MachineInstance.Describe", "{}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(result.stdout) == {"running": True, "status": "running"}, result.stdout + result.stderr


def _shape(node: object) -> object:
    """A comparable structure of python-varlink's parse tree, without comments and layout."""
    if isinstance(node, (str, int, float, bool)) or node is None:
        return node
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_shape(v) for v in node]
    if isinstance(node, type):
        return node.__name__
    fields = {k: _shape(v) for k, v in vars(node).items() if k not in ("doc", "signature")}
    return (type(node).__name__, fields)


def _interface_shape(text: str) -> object:
    interface = varlink.scanner.Interface(text)
    return {"name": interface.name, "members": _shape(dict(interface.members))}


def test_served_machine_instance_idl_is_systemds(daemon: Daemon, vm: JsonObject) -> None:
    with control(describe(daemon)) as conn:
        served = conn.call("org.varlink.service.GetInterfaceDescription", {"interface": "io.systemd.MachineInstance"})
    reference = (DOCS / "io.systemd.MachineInstance.varlink").read_text()
    shared = Path(__file__).resolve().parents[3] / "shared" / "io.systemd.MachineInstance.varlink"
    if shared.exists():
        assert shared.read_text() == reference  # our copy is systemd's text, unchanged
    assert _interface_shape(str(served["description"])) == _interface_shape(reference)


def test_pause_resume_reboot_show_in_qmp_and_events(daemon: Daemon, vm: JsonObject) -> None:
    machine = describe(daemon)
    boots = Path(str(machine["consoleLog"])).read_text(errors="replace").count("VMSPAWND-TEST: acpid-running")
    with EventStream(daemon, "life") as events, control(machine) as ctl:
        paused = daemon.call("Pause", {"name": "life"})["machine"]
        assert paused["paused"] is True
        events.wait_event("life", "STOP")
        assert ctl.call("io.systemd.MachineInstance.Describe") == {"running": False, "status": "paused"}
        daemon.call("Resume", {"name": "life"})
        events.wait_event("life", "RESUME")
        assert ctl.call("io.systemd.MachineInstance.Describe") == {"running": True, "status": "running"}
        daemon.call("Reboot", {"name": "life"})
        events.wait_event("life", "RESET")
    # A reset is not a stop: the same QEMU runs on, and the guest boots again.
    assert describe(daemon)["state"] in ("running", "ready")
    assert describe(daemon)["qemu"]["pid"] == machine["qemu"]["pid"]
    with Console(describe(daemon)) as console:
        console.wait_count("VMSPAWND-TEST: acpid-running", boots + 1)


def test_machine_instance_events_stream_qmp_events(daemon: Daemon, vm: JsonObject) -> None:
    machine = describe(daemon)
    with control(machine) as stream, control(machine) as ctl:
        stream.send("io.systemd.MachineInstance.SubscribeEvents", {"filter": ["STOP", "RESUME"]}, more=True)
        assert stream.receive()["parameters"] == {"event": "READY", "data": None}
        ctl.call("io.systemd.MachineInstance.Pause")
        ctl.call("io.systemd.MachineInstance.Resume")
        first = stream.receive()["parameters"]
        second = stream.receive()["parameters"]
    assert (first["event"], second["event"]) == ("STOP", "RESUME")


def test_wedged_qemu_times_out_without_slowing_anything_else(daemon: Daemon, vm: JsonObject, guest: Guest) -> None:
    daemon.call(
        "Spawn",
        {
            "spec": {
                "name": "other",
                "kvm": False,
                "ram": 128 * MIB,
                "linux": str(guest.kernel),
                "initrds": [str(guest.initrd)],
                "kernelCmdline": ["vmspawnd_test.mode=wait"],
            }
        },
    )
    pid = describe(daemon)["qemu"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        outcome: dict[str, object] = {}
        order: list[str] = []

        def pause_wedged() -> None:
            try:
                daemon.call("Pause", {"name": "life"})
            except VarlinkError as exc:
                outcome["error"] = exc
            order.append("wedged call returned")

        wedged = threading.Thread(target=pause_wedged)
        wedged.start()
        # While that call waits on the wedged QEMU, everything else answers.
        assert {m["name"] for m in daemon.call("List")["machines"]} >= {"life", "other"}
        assert describe(daemon, "other")["state"] in ("running", "ready")
        daemon.call("Pause", {"name": "other"})
        daemon.call("Resume", {"name": "other"})
        order.append("other VM answered")
        wedged.join(timeout=60)
        assert order == ["other VM answered", "wedged call returned"]
        error = outcome["error"]
        assert isinstance(error, VarlinkError) and error.name == f"{MANAGER}.Timeout"
        assert "stop" in str(error.parameters["operation"])
        with control(describe(daemon)) as ctl, pytest.raises(VarlinkError) as info:
            ctl.call("io.systemd.MachineInstance.Describe")
        assert info.value.name == f"{MANAGER}.Timeout"
    finally:
        os.kill(pid, signal.SIGCONT)
        daemon.call("Terminate", {"name": "other"})
        daemon.call("Remove", {"name": "other"})
    # QEMU still executes the commands that timed out (the `stop` among them) once it runs
    # again, in order; a Resume queued after them undoes the late pause.
    daemon.call("Resume", {"name": "life"})
    assert describe(daemon)["state"] in ("running", "ready")
    assert describe(daemon)["paused"] is False


def test_poweroff_through_machine_instance(daemon: Daemon, vm: JsonObject) -> None:
    machine = describe(daemon)
    with EventStream(daemon, "life") as events, control(machine) as ctl:
        ctl.call("io.systemd.MachineInstance.PowerOff")
        events.wait_state("life", "stopped", "failed")
    final = describe(daemon)
    assert final["state"] == "stopped"
    assert final["exitCode"] == 0
    assert "VMSPAWND-TEST: acpi-powerdown" in Path(str(final["consoleLog"])).read_text(errors="replace")
    assert not Path(str(machine["controlAddress"])).exists()
    daemon.call("Remove", {"name": "life"})


def test_start_wait_returns_once_the_guest_is_ready_and_shutdown_all(daemon: Daemon, guest: Guest) -> None:
    env = dict(os.environ, VMSPAWN_ADDRESS=daemon.address)
    with EventStream(daemon) as events:
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmspawnctl.main",
                "start",
                "--wait",
                "--timeout=300",
                "-M",
                "waiter",
                "--kvm=no",
                "--ram=256M",
                f"--linux={guest.kernel}",
                f"--initrd={guest.initrd}",
                "vmspawnd_test.mode=wait",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        events.wait_state("waiter", "running")
        assert cli.poll() is None  # still waiting: running is not ready yet
        notify_as_guest(str(describe(daemon, "waiter")["notifyAddress"]), b"READY=1\nSTATUS=Startup finished")
        out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    assert "VM waiter is ready." in out
    with Console(describe(daemon, "waiter")) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
    result = daemon.ctl("shutdown-all", "--timeout=120")
    assert result.returncode == 0, result.stderr
    assert "waiter: stopped (powered off on request)" in result.stdout
    daemon.call("Remove", {"name": "waiter"})
