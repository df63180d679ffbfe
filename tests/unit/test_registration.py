# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pure builders of vmspawnd.registration: Varlink parameters, D-Bus messages,
unit properties and the registration plan (docs/reference/systemd-vmspawn.md §5.1, §5.2)."""

from __future__ import annotations

import json
import signal

import pytest
from dbus_fast import Variant
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.host import registration as r

UUID = "01234567-89ab-cdef-0123-456789abcdef"


def test_varlink_parameters_full() -> None:
    info = r.RegistrationInfo(
        name="vm1", uuid=UUID, leader_pid=123, leader_pidfd_id=77, root_directory="/srv/t", vsock_cid=4711,
        ssh_private_key_path="/run/k", control_address="/run/vmspawnd/machines/x/control",
    )
    assert r.varlink_register_parameters(info) == {
        "name": "vm1", "id": "0123456789abcdef0123456789abcdef", "service": "vmspawnd", "class": "vm",
        "leaderProcessId": {"pid": 123, "pidfdId": 77}, "rootDirectory": "/srv/t", "vSockCid": 4711,
        "sshAddress": "vsock/4711", "sshPrivateKeyPath": "/run/k",
        "controlAddress": "/run/vmspawnd/machines/x/control",
    }
    assert "controlAddress" not in r.varlink_register_parameters(info, with_control_address=False)


def test_varlink_parameters_minimal_leave_unknown_fields_out() -> None:
    info = r.RegistrationInfo(name="vm1", leader_pid=5)
    assert r.varlink_register_parameters(info) == {
        "name": "vm1", "service": "vmspawnd", "class": "vm", "leaderProcessId": {"pid": 5},
    }


def test_varlink_frame() -> None:
    frame = r.varlink_frame("io.systemd.Machine.Unregister", {"name": "a"})
    assert frame.endswith(b"\0")
    assert json.loads(frame[:-1]) == {"method": "io.systemd.Machine.Unregister", "parameters": {"name": "a"}}


def test_register_machine_message() -> None:
    msg = r.register_machine_message(r.RegistrationInfo(name="vm1", uuid=UUID, leader_pid=9))
    assert (msg.destination, msg.path, msg.interface, msg.member, msg.signature) == (
        "org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager",
        "RegisterMachine", "sayssus",
    )
    assert msg.body == ["vm1", bytes.fromhex(UUID.replace("-", "")), "vmspawnd", "vm", 9, ""]
    assert r.register_machine_message(r.RegistrationInfo(name="x")).body[1] == b""
    un = r.unregister_machine_message("vm1")
    assert (un.member, un.signature, un.body) == ("UnregisterMachine", "s", ["vm1"])


def test_systemd_messages() -> None:
    start = r.start_transient_unit_message("a.scope", [["Description", Variant("s", "x")]])
    assert (start.member, start.signature, start.body[0], start.body[1], start.body[3]) == (
        "StartTransientUnit", "ssa(sv)a(sa(sv))", "a.scope", "fail", [],
    )
    assert start.destination == "org.freedesktop.systemd1" and start.path == "/org/freedesktop/systemd1"
    kill = r.kill_unit_message("a.scope")
    assert (kill.member, kill.signature, kill.body) == ("KillUnit", "ssi", ["a.scope", "all", int(signal.SIGKILL)])
    assert (r.abandon_scope_message("a.scope").member, r.abandon_scope_message("a.scope").signature) == ("AbandonScope", "s")
    assert (r.unref_unit_message("a.scope").member, r.unref_unit_message("a.scope").body) == ("UnrefUnit", ["a.scope"])


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("foo.scope", "foo_2escope"), ("", "_"), ("1a", "_31a"), ("a-b_c", "a_2db_5fc"), ("a1", "a1")],
)
def test_bus_label_escape(text: str, escaped: str) -> None:
    assert r.bus_label_escape(text) == escaped


@given(st.text(min_size=1, max_size=40))
def test_bus_label_escape_gives_valid_path_elements(text: str) -> None:
    label = r.bus_label_escape(text)
    assert label and all(c.isascii() and (c.isalnum() or c == "_") for c in label)
    assert not label[0].isdigit()


def test_unit_object_path() -> None:
    assert r.unit_object_path("vm-1.scope") == "/org/freedesktop/systemd1/unit/vm_2d1_2escope"


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("Description=My VM", ("Description", "s", "My VM")),
        ("CPUQuota=20%", ("CPUQuotaPerSecUSec", "t", 200_000)),
        ("CPUQuota=150%", ("CPUQuotaPerSecUSec", "t", 1_500_000)),
        ("CPUQuota=", ("CPUQuotaPerSecUSec", "t", 2**64 - 1)),
        ("MemoryMax=512M", ("MemoryMax", "t", 512 * 1024**2)),
        ("MemoryMax=infinity", ("MemoryMax", "t", 2**64 - 1)),
        ("MemoryHigh=50%", ("MemoryHighScale", "u", 2**31)),
        ("TasksMax=100", ("TasksMax", "t", 100)),
        ("TasksMax=100%", ("TasksMaxScale", "u", 2**32 - 1)),
        ("CPUWeight=200", ("CPUWeight", "t", 200)),
        ("CPUWeight=idle", ("CPUWeight", "t", 0)),
        ("IOWeight=10000", ("IOWeight", "t", 10000)),
        ("DeviceAllow=/dev/kvm rw", ("DeviceAllow", "a(ss)", [["/dev/kvm", "rw"]])),
        ("DeviceAllow=/dev/net/tun", ("DeviceAllow", "a(ss)", [["/dev/net/tun", ""]])),
        ("DeviceAllow=", ("DeviceAllow", "a(ss)", [])),
        ("DevicePolicy=closed", ("DevicePolicy", "s", "closed")),
        ("ManagedOOMMemoryPressure=kill", ("ManagedOOMMemoryPressure", "s", "kill")),
        ("AllowedCPUs=0-2 9", ("AllowedCPUs", "ay", bytes([0b111, 0b10]))),
        ("AllowedMemoryNodes=0", ("AllowedMemoryNodes", "ay", b"\x01")),
        ("AllowedCPUs=", ("AllowedCPUs", "ay", b"")),
        ("MemoryLow=1K", ("MemoryLow", "t", 1024)),
        ("MemoryMin=10%", ("MemoryMinScale", "u", 429496730)),
        ("MemorySwapMax=infinity", ("MemorySwapMax", "t", 2**64 - 1)),
        ("StartupCPUWeight=5", ("StartupCPUWeight", "t", 5)),
        ("StartupIOWeight=7", ("StartupIOWeight", "t", 7)),
    ],
)
def test_convert_unit_property(assignment: str, expected: tuple[str, str, object]) -> None:
    name, value = r.convert_unit_property(assignment)
    assert (name, value.signature, value.value) == expected


@pytest.mark.parametrize(
    "assignment",
    ["CPUQuota=20", "CPUQuota=0%", "CPUWeight=0", "IOWeight=10001", "TasksMax=0", "MemoryMax=1x",
     "DeviceAllow=/dev/kvm rx", "KillMode=mixed", "NoEquals", "MemoryMax=101%", "DevicePolicy=open",
     "AllowedCPUs=3-1", "AllowedCPUs=a"],
)
def test_convert_unit_property_refuses(assignment: str) -> None:
    with pytest.raises(ValueError):
        r.convert_unit_property(assignment)


def test_scope_properties() -> None:
    props = r.scope_properties("vm1", None, [10, 11], ["TasksMax=50"], ":1.5")
    plain = {name: (v.signature, v.value) for name, v in props}
    assert plain == {
        "Description": ("s", "Virtual Machine vm1"),
        "CollectMode": ("s", "inactive-or-failed"),
        "AddRef": ("b", True),
        "Slice": ("s", "machine.slice"),
        "Before": ("as", ["vmspawnd-guests.service"]),  # stopped after the guests powered off
        "Controller": ("s", ":1.5"),
        "PIDs": ("au", [10, 11]),
        "TasksMax": ("t", 50),
    }
    with_fds = {name: (v.signature, v.value) for name, v in r.scope_properties("vm1", "my/vms", [10, 11], [], None, 2)}
    assert with_fds["PIDFDs"] == ("ah", [0, 1]) and "PIDs" not in with_fds
    assert with_fds["Slice"] == ("s", "my-vms.slice")
    assert "Controller" not in with_fds


def test_scope_unit_name_is_mangled() -> None:
    assert r.scope_unit_name("vm1") == "vm1.scope"


@pytest.mark.parametrize(
    ("register", "keep_unit", "booted", "expected"),
    [
        # machined never allocates the unit: vmspawnd's scope holds every process of the VM
        (None, False, True, r.Plan(register=True, required=False, own_scope=True, join_unit=False)),
        (True, False, True, r.Plan(register=True, required=True, own_scope=True, join_unit=False)),
        (False, False, True, r.Plan(register=False, required=False, own_scope=True, join_unit=False)),
        (None, True, True, r.Plan(register=True, required=False, own_scope=False, join_unit=True)),
        (None, False, False, r.Plan(register=True, required=False, own_scope=False, join_unit=False)),
        (None, True, False, r.Plan(register=True, required=False, own_scope=False, join_unit=False)),
    ],
)
def test_plan(register: bool | None, keep_unit: bool, booted: bool, expected: r.Plan) -> None:
    assert r.plan(register, keep_unit, booted) == expected


def test_attach_processes_message() -> None:
    msg = r.attach_processes_message("client.service", [10, 11])
    assert (msg.member, msg.signature, msg.body) == ("AttachProcessesToUnit", "ssau", ["client.service", "", [10, 11]])


def test_machined_address() -> None:
    assert r.machined_address({}, True) == "/run/systemd/machine/io.systemd.Machine"
    assert r.machined_address({"XDG_RUNTIME_DIR": "/run/user/1000"}, False) == "/run/user/1000/systemd/machine/io.systemd.Machine"
    assert r.machined_address({"VMSPAWND_MACHINED_ADDRESS": "/tmp/m"}, True) == "/tmp/m"


def test_systemd_is_service_manager() -> None:
    assert r.systemd_is_service_manager({}, lambda p: p == "/run/systemd/system")
    assert not r.systemd_is_service_manager({}, lambda p: False)
    assert not r.systemd_is_service_manager({"VMSPAWND_SYSTEMD_BOOTED": "0"}, lambda p: True)
    assert r.systemd_is_service_manager({"VMSPAWND_SYSTEMD_BOOTED": "1"}, lambda p: False)


def test_info_for_reads_optional_record_fields() -> None:
    class Record:
        name = "vm1"
        vsock_cid = 99
        ssh_private_key_path = "/k"
        control_address = "/c"

    class Spec:
        uuid = UUID
        directory = None

    info = r.info_for(Record(), Spec(), 42)
    assert info == r.RegistrationInfo(
        name="vm1", uuid=UUID, leader_pid=42, vsock_cid=99, ssh_private_key_path="/k", control_address="/c",
    )

    class Bare:
        name = "vm2"

    assert r.info_for(Bare(), Bare(), 1) == r.RegistrationInfo(name="vm2", leader_pid=1)


def test_every_property_the_spec_accepts_is_converted() -> None:
    """--property names vmspawnctl lets through must not fail later at the scope step."""
    from vmspawnd.spec import SCOPE_PROPERTIES

    assert set(SCOPE_PROPERTIES) <= set(r.SUPPORTED_PROPERTIES)
