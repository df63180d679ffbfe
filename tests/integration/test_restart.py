# SPDX-License-Identifier: LGPL-2.1-or-later
"""VMs survive the daemon: SIGKILL (and a clean stop) of vmspawnd, then re-adoption.

Stand-in, and why: PID 1 on this machine does not reap orphans; on a real host systemd
(PID 1) reaps whatever the killed daemon left. This module makes the test process a child
subreaper that reaps such orphans, the one part of PID 1's job the scenario needs.
Everything else is real: QEMU, the guest, the reapers, the daemon and its clients.

The VM caught mid-start is held deterministically by a `qemu-system-x86_64` wrapper first
on the daemon's PATH: for the VM whose kernel command line carries `vmspawnd_test.hold=1`
it opens a FIFO (the test's "it is held now" event) and then blocks on another one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import Connection, ConnectionFailed, JsonObject, VarlinkError

from tests.guest.build import Guest
from tests.support import (
    Console,
    Daemon,
    EventStream,
    make_runtime_dir,
    process_state,
    qemu_processes,
    reap_orphans,
    set_subreaper,
    start_daemon,
    stop_daemon,
)

pytestmark = pytest.mark.vm

MIB = 1024 * 1024

WRAPPER = """#!/bin/sh
case " $* " in
  *vmspawnd_test.hold=1*)
    echo held > "$VMSPAWND_TEST_HOLD/held"
    read -r _ < "$VMSPAWND_TEST_HOLD/release" ;;
esac
exec /usr/bin/qemu-system-x86_64 "$@"
"""


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, object]]:
    set_subreaper(True)
    runtime = make_runtime_dir()
    # On the system instance QEMU, and so the wrapper, runs as the VM's own uid
    # (docs/security.md): the wrapper and its FIFOs must be reachable by any user.
    shared = Path(tempfile.mkdtemp(prefix="vmspawnd-restart-", dir="/tmp"))
    shared.chmod(0o755)
    hold, bindir = shared / "hold", shared / "bin"
    hold.mkdir(mode=0o755)
    bindir.mkdir(mode=0o755)
    wrapper = bindir / "qemu-system-x86_64"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    for fifo in ("held", "release"):
        os.mkfifo(hold / fifo)
        (hold / fifo).chmod(0o666)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", VMSPAWND_TEST_HOLD=str(hold))
    state: dict[str, object] = {"runtime": runtime, "env": env, "hold": hold}
    try:
        yield state
    finally:
        daemon = state.get("daemon")
        if isinstance(daemon, Daemon):
            stop_daemon(daemon)
        reap_orphans()
        set_subreaper(False)
        shutil.rmtree(runtime.parent, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


def wait_for_file_text(path: Path, text: str, timeout: float = 60.0) -> None:
    """Poll a file QEMU appends to (no daemon runs, so no event says it was written)."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} never reached {path}"
        time.sleep(0.1)


def spec(guest: Guest, name: str, mode: str, *extra: str) -> dict[str, object]:
    return {
        "name": name,
        "kvm": False,
        "ram": 192 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": [f"vmspawnd_test.mode={mode}", *extra],
    }


def describe(daemon: Daemon, name: str) -> JsonObject:
    machine: JsonObject = daemon.call("Describe", {"name": name})["machine"]
    return machine


def test_sigkill_while_starting_running_paused_and_powering_off(world: dict[str, object], guest: Guest) -> None:
    runtime = world["runtime"]
    env = world["env"]
    hold = world["hold"]
    assert isinstance(runtime, Path) and isinstance(env, dict) and isinstance(hold, Path)
    first = start_daemon(runtime, env=env)
    world["daemon"] = first

    with EventStream(first) as events:
        first.call("Spawn", {"spec": spec(guest, "run1", "wait")})
        first.call("Spawn", {"spec": spec(guest, "paused1", "wait")})
        first.call("Spawn", {"spec": spec(guest, "stopping1", "ignore-acpi")})
        with Console(describe(first, "run1")) as console:
            console.wait_for(r"VMSPAWND-TEST: acpid-running")
        with Console(describe(first, "stopping1")) as console:
            console.wait_for(r"VMSPAWND-TEST: ignoring-acpi")
        first.call("Pause", {"name": "paused1"})
        # A power-off that will not complete (the guest ignores ACPI): stopping when killed.
        threading.Thread(
            target=lambda: _ignore_errors(first.call, "PowerOff", {"name": "stopping1", "deadline": 3600}), daemon=True
        ).start()
        events.wait_state("stopping1", "stopping")
        threading.Thread(
            target=lambda: _ignore_errors(
                first.call, "Spawn", {"spec": spec(guest, "starting1", "wait", "vmspawnd_test.hold=1")}
            ),
            daemon=True,
        ).start()
        with open(hold / "held") as held:  # returns once the wrapper holds the start
            held.read()

    before = {name: describe(first, name) for name in ("run1", "paused1", "stopping1", "starting1")}
    # Something the guest will print while no daemon runs: QEMU's logfile keeps it.
    with Console(before["run1"]) as console:
        console.send("echo gap-start-$((1+1)); sleep 3; echo in-the-gap-$((20+1))\n")
        console.wait_for(r"gap-start-2")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    first.notify.close()
    wait_for_file_text(Path(str(before["run1"]["consoleLog"])), "in-the-gap-21")
    starting_pid = before["starting1"]["qemu"]["pid"]
    assert os.path.exists(f"/proc/{starting_pid}")  # held, not started

    second = start_daemon(runtime, env=env)
    world["daemon"] = second
    machines = {m["name"]: m for m in second.call("List")["machines"]}

    # Mid-start: gone and cleaned, its held process stopped.
    assert "starting1" not in machines
    assert not Path(str(before["starting1"]["runtimeDirectory"])).exists()
    assert not os.path.exists(f"/proc/{starting_pid}") or process_state(starting_pid) == "Z"
    # Running and paused: the same QEMU processes, adopted; nothing runs twice.
    for name in ("run1", "paused1"):
        assert machines[name]["state"] == "ready"
        assert machines[name]["qemu"] == before[name]["qemu"]
    assert machines["paused1"]["paused"] is True
    expected = {before["run1"]["qemu"]["pid"], before["paused1"]["qemu"]["pid"]}
    assert expected <= set(qemu_processes())
    # Shutdown in progress: finished (by the new daemon, without a client asking).
    finished = wait_final(second, "stopping1")
    assert finished["state"] == "stopped"
    assert finished["reason"] == "powered off on request"
    assert before["stopping1"]["qemu"]["pid"] not in qemu_processes()

    # The adopted VMs answer: QMP (Pause shows in query-status, a STOP event arrives),
    # the console has its history and takes input, PowerOff works.
    with EventStream(second, "run1") as events, Connection(str(machines["run1"]["controlAddress"]), timeout=60) as ctl:
        second.call("Pause", {"name": "run1"})
        events.wait_event("run1", "STOP")
        assert ctl.call("io.systemd.MachineInstance.Describe") == {"running": False, "status": "paused"}
        second.call("Resume", {"name": "run1"})
        events.wait_event("run1", "RESUME")
    history = second.call("ReadConsoleLog", {"name": "run1"})
    assert "VMSPAWND-TEST: acpid-running" in str(history)
    assert "in-the-gap-21" in str(history)  # written while no daemon was there
    with Console(describe(second, "run1")) as console:
        console.send("echo typed-after-$((40+2))\n")
        console.wait_for(r"typed-after-42")
    second.call("Resume", {"name": "paused1"})
    assert describe(second, "paused1")["paused"] is False
    stopped = second.call("PowerOff", {"name": "run1", "deadline": 120})["machine"]
    assert stopped["state"] == "stopped" and stopped["reason"] == "powered off on request"
    assert stopped["exitCode"] == 0  # known although QEMU was no child of this daemon

    # A clean restart (SIGTERM) leaves VMs running, and the next daemon adopts them too.
    pid = describe(second, "paused1")["qemu"]["pid"]
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=60) == 0
    second.notify.close()
    assert pid in qemu_processes()
    third = start_daemon(runtime, env=env)
    world["daemon"] = third
    assert describe(third, "paused1")["qemu"]["pid"] == pid
    third.call("Pause", {"name": "paused1"})
    third.call("Resume", {"name": "paused1"})
    terminated = third.call("Terminate", {"name": "paused1"})["machine"]
    assert terminated["state"] == "stopped"
    assert pid not in qemu_processes()


def wait_final(daemon: Daemon, name: str) -> JsonObject:
    """The VM's record once it has ended (subscribing first, so the end is not missed)."""
    with EventStream(daemon, name) as events:
        machine = describe(daemon, name)
        if machine["state"] not in ("stopped", "failed"):
            events.wait_state(name, "stopped", "failed")
            machine = describe(daemon, name)
    return machine


def _ignore_errors(function: Callable[..., object], *args: object) -> None:
    try:
        function(*args)
    except (VarlinkError, ConnectionFailed, OSError):
        pass  # the daemon is killed under this call on purpose


def test_unusable_state_is_cleaned_and_stop_vms_on_exit(world: dict[str, object], guest: Guest) -> None:
    """Unreadable or other-version state: logged, its (same) processes stopped, files removed;
    and --stop-vms-on-exit powers VMs off when the daemon stops."""
    runtime = world["runtime"]
    env = world["env"]
    assert isinstance(runtime, Path) and isinstance(env, dict)
    daemon = world.pop("daemon", None)
    if isinstance(daemon, Daemon):
        stop_daemon(daemon)
    first = start_daemon(runtime, env=env)
    world["daemon"] = first
    future = first.call("Spawn", {"spec": spec(guest, "future", "wait")})["machine"]
    garbled = first.call("Spawn", {"spec": spec(guest, "garbled", "wait")})["machine"]
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    first.notify.close()
    # A newer format this daemon does not know, and a state file that is not JSON.
    future_state = Path(str(future["runtimeDirectory"])) / "state.json"
    data = json.loads(future_state.read_text())
    data["version"] = 99
    future_state.write_text(json.dumps(data))
    (Path(str(garbled["runtimeDirectory"])) / "state.json").write_text("{not json")

    second = start_daemon(runtime, "--stop-vms-on-exit", env=env)
    world["daemon"] = second
    assert second.call("List")["machines"] == []
    log = second.log()
    assert "unsupported state format version 99" in log and "unreadable state" in log
    # Their processes were stopped (found from the record, or from the VM directory named on
    # their command lines when the record is garbage) and both directories are gone.
    assert future["qemu"]["pid"] not in qemu_processes()
    assert garbled["qemu"]["pid"] not in qemu_processes()
    assert not Path(str(future["runtimeDirectory"])).exists()
    assert not Path(str(garbled["runtimeDirectory"])).exists()

    survivor = second.call("Spawn", {"spec": spec(guest, "survivor", "wait")})["machine"]
    with Console(describe(second, "survivor")) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=120) == 0
    second.notify.close()
    world.pop("daemon")
    assert survivor["qemu"]["pid"] not in qemu_processes()
    assert "VMSPAWND-TEST: acpi-powerdown" in Path(str(survivor["consoleLog"])).read_text(errors="replace")
