# SPDX-License-Identifier: LGPL-2.1-or-later
"""The Manager in this process, its VMs run by the fake QEMU (tests/fakes/fake_qemu.py):
fast seam tests beside the daemon tests of tests/integration, which use the real QEMU.

Names are reserved before anything starts and freed by a failed start; a VM that ran keeps
its record until Remove; shutdown waits for starts in flight and stops or leaves the VMs;
a new Manager on the same directory takes running VMs back, records those that ended
meanwhile, and discards what it cannot read.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.component.conftest import SETTINGS, FakeHost, state_of
from vmspawnd.errors import InvalidSpec, InvalidState, MachineExists, NoSuchMachine, StartFailed
from vmspawnd.manager import Manager
from vmspawnd.model import MachineState

UID = os.geteuid()


def manager_for(fake_host: FakeHost) -> Manager:
    return Manager(fake_host.root, SETTINGS)


async def stop_all(manager: Manager) -> None:
    await manager.shutdown(stop_vms=True)


def reap(pid: int) -> None:
    """A VM's reaper that a Manager let go of is still a child of this process (the test is
    both the old and the new daemon); a real restarted daemon is not its parent."""
    os.waitpid(pid, 0)


@pytest.mark.asyncio
async def test_spawn_list_remove_and_the_name_is_free_again(fake_host: FakeHost) -> None:
    manager = manager_for(fake_host)
    record = await manager.spawn(fake_host.spec("one"), UID)
    assert record.state is MachineState.READY and record.uid == UID
    assert manager.list() == [record] and manager.get("one").record is record
    with pytest.raises(MachineExists):
        await manager.spawn(fake_host.spec("one"), UID)
    with pytest.raises(InvalidState):
        await manager.remove("one")  # still running
    await manager.get("one").power_off()
    assert manager.list()[0].state is MachineState.STOPPED  # the record stays until Remove
    directory = Path(record.runtime_directory)
    with manager.subscribe() as queue:
        await manager.remove("one")
        assert queue.get_nowait() == {"machine": "one", "event": "Removed", "data": {}}
    assert manager.list() == [] and not directory.exists()
    with pytest.raises(NoSuchMachine):
        manager.get("one")
    again = await manager.spawn(fake_host.spec("one"), UID)
    assert again.id != record.id
    await stop_all(manager)


@pytest.mark.asyncio
async def test_two_spawns_of_one_name_at_once_start_one_vm(fake_host: FakeHost) -> None:
    manager = manager_for(fake_host)
    results = await asyncio.gather(
        manager.spawn(fake_host.spec("twin"), UID), manager.spawn(fake_host.spec("twin"), UID), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["MachineExists", "MachineRecord"]
    assert [r.name for r in manager.list()] == ["twin"]
    assert len(list(fake_host.machines_dir.iterdir())) == 1
    await stop_all(manager)


@pytest.mark.asyncio
async def test_a_failed_start_leaves_no_record_and_frees_the_name(fake_host: FakeHost) -> None:
    manager = manager_for(fake_host)
    with pytest.raises(StartFailed) as failed:
        await manager.spawn(fake_host.spec("bad", "exit=1"), UID)
    assert failed.value.step == "qmp"
    assert manager.list() == []
    assert list(fake_host.machines_dir.iterdir()) == []
    assert fake_host.processes() == []
    record = await manager.spawn(fake_host.spec("bad"), UID)  # same name, now without the fault
    assert record.state is MachineState.READY
    await stop_all(manager)


@pytest.mark.asyncio
async def test_an_invalid_spec_reserves_nothing(fake_host: FakeHost) -> None:
    manager = manager_for(fake_host)
    with pytest.raises(InvalidSpec) as invalid:
        await manager.spawn(fake_host.spec("nokernel", linux=str(fake_host.root / "missing")), UID)
    assert invalid.value.field == "linux"
    assert manager.list() == [] and list(fake_host.machines_dir.iterdir()) == []


@pytest.mark.asyncio
async def test_events_of_every_vm_reach_subscribers(fake_host: FakeHost) -> None:
    manager = manager_for(fake_host)
    with manager.subscribe() as queue:
        await manager.spawn(fake_host.spec("a"), UID)
        await manager.spawn(fake_host.spec("b"), UID)
        await stop_all(manager)
        seen = []
        while not queue.empty():
            message = queue.get_nowait()
            if message["event"] == "StateChanged":
                seen.append((message["machine"], message["data"]["state"]))
    for name in ("a", "b"):
        assert [state for machine, state in seen if machine == name] == ["starting", "running", "ready", "stopping", "stopped"]


@pytest.mark.asyncio
async def test_shutdown_stopping_vms_powers_each_off(fake_host: FakeHost) -> None:
    manager = manager_for(fake_host)
    await manager.spawn(fake_host.spec("a"), UID)
    await manager.spawn(fake_host.spec("b"), UID)
    await manager.shutdown(stop_vms=True)
    assert [(r.name, r.state, r.reason) for r in manager.list()] == [
        ("a", MachineState.STOPPED, "powered off on request"),
        ("b", MachineState.STOPPED, "powered off on request"),
    ]
    assert fake_host.processes() == []


@pytest.mark.asyncio
async def test_shutdown_waits_for_a_start_in_flight(fake_host: FakeHost) -> None:
    manager = manager_for(fake_host)
    spawn = asyncio.create_task(manager.spawn(fake_host.spec("late"), UID))
    await asyncio.sleep(0)  # one turn of the loop: the spawn reserved its name and started
    assert [(r.name, r.state) for r in manager.list()] == [("late", MachineState.STARTING)]
    await manager.shutdown(stop_vms=True)
    record = await spawn
    assert record.state is MachineState.STOPPED
    assert fake_host.processes() == []


@pytest.mark.asyncio
async def test_a_restarted_manager_takes_running_vms_back(fake_host: FakeHost) -> None:
    first = manager_for(fake_host)
    before = await first.spawn(fake_host.spec("kept"), UID)
    assert before.qemu is not None and before.reaper is not None
    await first.shutdown(stop_vms=False)  # the daemon exits, the VM runs on
    assert set(fake_host.processes()) == {before.qemu.pid, before.reaper.pid}

    second = manager_for(fake_host)
    await second.adopt_all()
    machine = second.get("kept")
    assert machine.record.state is MachineState.READY
    assert machine.record.qemu is not None and machine.record.qemu.pid == before.qemu.pid
    assert (await machine.query_status())["status"] == "running"  # QMP reconnected
    await machine.power_off()
    assert state_of(machine) is MachineState.STOPPED
    assert machine.record.exit_code == 0  # known although QEMU was not its child: the reaper recorded it
    reap(before.reaper.pid)


@pytest.mark.asyncio
async def test_a_vm_that_ended_while_no_manager_ran_is_recorded(fake_host: FakeHost) -> None:
    first = manager_for(fake_host)
    before = await first.spawn(fake_host.spec("crashed"), UID)
    assert before.qemu is not None and before.reaper is not None
    await first.shutdown(stop_vms=False)
    os.kill(before.qemu.pid, signal.SIGSEGV)
    reap(before.reaper.pid)  # exits once it has recorded QEMU's status

    second = manager_for(fake_host)
    await second.adopt_all()
    record = second.get("crashed").record
    assert record.state is MachineState.FAILED
    assert (record.reason, record.exit_signal) == ("QEMU was killed by SIGSEGV", signal.SIGSEGV)
    assert not Path(record.runtime_directory, "qmp").exists()  # its leftovers are cleaned up


@pytest.mark.asyncio
async def test_an_unreadable_record_is_discarded_with_its_processes(fake_host: FakeHost) -> None:
    first = manager_for(fake_host)
    before = await first.spawn(fake_host.spec("garbled"), UID)
    assert before.reaper is not None
    await first.shutdown(stop_vms=False)
    Path(before.runtime_directory, "state.json").write_text("{not json")

    second = manager_for(fake_host)
    await second.adopt_all()
    assert second.list() == []
    assert not Path(before.runtime_directory).exists()
    reap(before.reaper.pid)
    assert fake_host.processes() == []  # found by the directory on their command lines and stopped


@pytest.mark.asyncio
async def test_a_vm_that_cannot_be_saved_is_refused_before_a_bundle_is_made(fake_host: FakeHost) -> None:
    """A paused VM with a network card (its guest must eject the card for the save) and a
    VM that no longer runs: InvalidState naming why, and the store stays empty."""
    manager = manager_for(fake_host)
    await manager.spawn(fake_host.spec("net", networkUserMode=True), UID)
    machine = manager.get("net")
    await machine.pause()
    with pytest.raises(InvalidState) as paused:
        await manager.snapshot("net", None, None, stop=False)
    assert "network card" in str(paused.value) and not manager.snapshots.root.exists()
    await machine.resume()
    await machine.power_off()
    with pytest.raises(InvalidState):
        await manager.snapshot("net", "later", None, stop=False)
    assert not manager.snapshots.root.exists()  # not even the store: nothing was made
    await stop_all(manager)
