# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pure builders of vmspawnd.host.machined: what systemd-machined is told, as Varlink
parameters and as D-Bus messages (docs/reference/systemd-vmspawn.md §5.1)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from tests.standins import machined_varlink
from vmspawnd.host import machined
from vmspawnd.host.dbus import connect_bus
from vmspawnd.model import MachineRecord
from vmspawnd.spec import VmSpec

UUID = "01234567-89ab-cdef-0123-456789abcdef"


def test_varlink_parameters_full() -> None:
    info = machined.RegistrationInfo(
        name="vm1",
        uuid=UUID,
        leader_pid=123,
        leader_pidfd_id=77,
        root_directory="/srv/t",
        vsock_cid=4711,
        ssh_private_key_path="/run/k",
        control_address="/run/vmspawnd/machines/x/control",
    )
    assert machined.varlink_register_parameters(info) == {
        "name": "vm1",
        "id": "0123456789abcdef0123456789abcdef",
        "service": "vmspawnd",
        "class": "vm",
        "leaderProcessId": {"pid": 123, "pidfdId": 77},
        "rootDirectory": "/srv/t",
        "vSockCid": 4711,
        "sshAddress": "vsock/4711",
        "sshPrivateKeyPath": "/run/k",
        "controlAddress": "/run/vmspawnd/machines/x/control",
    }
    assert "controlAddress" not in machined.varlink_register_parameters(info, with_control_address=False)


def test_varlink_parameters_minimal_leave_unknown_fields_out() -> None:
    info = machined.RegistrationInfo(name="vm1", leader_pid=5)
    assert machined.varlink_register_parameters(info) == {
        "name": "vm1",
        "service": "vmspawnd",
        "class": "vm",
        "leaderProcessId": {"pid": 5},
    }


def test_varlink_frame() -> None:
    frame = machined.varlink_frame("io.systemd.Machine.Unregister", {"name": "a"})
    assert frame.endswith(b"\0")
    assert json.loads(frame[:-1]) == {"method": "io.systemd.Machine.Unregister", "parameters": {"name": "a"}}


def test_register_machine_message() -> None:
    msg = machined.register_machine_message(machined.RegistrationInfo(name="vm1", uuid=UUID, leader_pid=9))
    assert (msg.destination, msg.path, msg.interface, msg.member, msg.signature) == (
        "org.freedesktop.machine1",
        "/org/freedesktop/machine1",
        "org.freedesktop.machine1.Manager",
        "RegisterMachine",
        "sayssus",
    )
    assert msg.body == ["vm1", bytes.fromhex(UUID.replace("-", "")), "vmspawnd", "vm", 9, ""]
    assert machined.register_machine_message(machined.RegistrationInfo(name="x")).body[1] == b""
    un = machined.unregister_machine_message("vm1")
    assert (un.member, un.signature, un.body) == ("UnregisterMachine", "s", ["vm1"])


def test_machined_address() -> None:
    assert machined.machined_address({}, True) == "/run/systemd/machine/io.systemd.Machine"
    assert (
        machined.machined_address({"XDG_RUNTIME_DIR": "/run/user/1000"}, False)
        == "/run/user/1000/systemd/machine/io.systemd.Machine"
    )
    assert machined.machined_address({"VMSPAWND_MACHINED_ADDRESS": "/tmp/m"}, True) == "/tmp/m"


def test_info_for_reads_optional_record_fields() -> None:
    """The record's optional fields ("" = none) and the spec's, typed: the guest's CID comes
    from the caller, as the record does not keep it (the Machine passes its resources' CID)."""
    record = MachineRecord(name="vm1", id="a1", uid=0, spec={}, ssh_private_key_path="/k", control_address="/c")
    info = machined.info_for(record, VmSpec(uuid=UUID), 42, vsock_cid=99)
    assert info == machined.RegistrationInfo(
        name="vm1",
        uuid=UUID,
        leader_pid=42,
        vsock_cid=99,
        ssh_private_key_path="/k",
        control_address="/c",
    )

    bare = MachineRecord(name="vm2", id="a2", uid=0, spec={})
    assert machined.info_for(bare, VmSpec(), 1) == machined.RegistrationInfo(name="vm2", leader_pid=1)


def test_info_for_leaves_out_cids_that_are_no_guests() -> None:
    """0 (hypervisor), 1 (local) and 2 (host) are never a guest's CID: machined gets none."""
    record = MachineRecord(name="vm1", id="a1", uid=0, spec={})
    assert [machined.info_for(record, VmSpec(), 1, vsock_cid=cid).vsock_cid for cid in (0, 1, 2, 3)] == [None, None, None, 3]
    assert machined.info_for(record, VmSpec(directory="/srv/tree"), 1).root_directory == "/srv/tree"


@pytest.mark.asyncio
async def test_register_with_machined_exists_ok_takes_a_kept_registration(tmp_path: Path) -> None:
    """A restarted daemon registers the VM it adopted again: machined may have kept it.
    machined is tests/standins/machined_varlink (asyncvarlink speaking machined's IDL), as
    no machined runs here; the call goes over a real Unix socket."""
    address = tmp_path / "io.systemd.Machine"
    iface, server = await machined_varlink.serve(address)
    iface.machines["vm1"] = {}

    async def no_bus() -> MessageBus:
        raise AssertionError("machined answered over Varlink: D-Bus is not tried")

    try:
        info = machined.RegistrationInfo(name="vm1", leader_pid=os.getpid())
        kept = await machined.register_with_machined(info, str(address), no_bus, exists_ok=True)
        assert kept == machined.MachinedResult(varlink_address=str(address))
        refused = await machined.register_with_machined(info, str(address), no_bus, exists_ok=False)
        assert refused.varlink_address is None and not refused.dbus_registered
        assert refused.problem == f"io.systemd.Machine.Register at {address}: io.systemd.Machine.MachineExists"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_register_with_machined_absent_everywhere_is_no_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Varlink socket and no bus: not registered, and nothing to report (auto skips quietly)."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'no-bus'}")
    info = machined.RegistrationInfo(name="vm1", leader_pid=os.getpid())
    result = await machined.register_with_machined(
        info,
        str(tmp_path / "no-machined"),
        functools.partial(connect_bus, True),
        exists_ok=False,
    )
    assert result == machined.MachinedResult()
