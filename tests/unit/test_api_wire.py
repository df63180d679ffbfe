# SPDX-License-Identifier: LGPL-2.1-or-later
"""Machine replies are the record's JSON as is: it must match the declared Machine type."""

from __future__ import annotations

from asyncvarlink.conversion import DataclassVarlinkType

from vmspawnd.model import MachineRecord, MachineState, ProcessRecord
from vmspawnd.spec import BindMount, CredentialData, VmSpec
from vmspawnd.spec.wire import Machine as MachineWire


def full_record() -> MachineRecord:
    spec = VmSpec(
        name="full",
        linux="/k",
        initrds=["/i"],
        binds=[BindMount("/a", "/b", True)],
        credentials=[CredentialData("x", "YQ==")],
        tpm=True,
        kernel_cmdline=["a=b"],
    )
    record = MachineRecord(name="full", id="0011aabb", uid=0, spec=spec.to_json())
    record.enter(MachineState.STARTING)
    record.enter(MachineState.RUNNING)
    record.qemu = ProcessRecord(10, 20, "boot")
    record.reaper = ProcessRecord(9, 19, "boot")
    record.helpers = {"swtpm": ProcessRecord(11, 21, "boot")}
    record.exit_status = 3
    return record


def test_record_json_is_a_valid_machine_reply() -> None:
    declared = DataclassVarlinkType(MachineWire)
    for record in (full_record(), MachineRecord(name="bare", id="00000000", uid=1000, spec={"linux": "/k"})):
        wire = record.to_json()
        parsed = declared.fromjson(wire)  # raises on any field the IDL does not declare or types differently
        assert declared.tojson(parsed)["name"] == record.name
        assert set(wire) == {f for f in declared.tojson(parsed)}
