# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd/spec/wire.py is exactly what tests/wire_codegen.py renders from the pure types.

Regenerate with VMSPAWND_REGENERATE=1 and review the diff (the IDL in docs/interfaces/ follows
from it: regenerate that too, tests/unit/test_interfaces.py).
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

from tests.wire_codegen import render_wire_module
from vmspawnd.model import MachineRecord, ProcessRecord
from vmspawnd.spec import wire

WIRE_MODULE = Path(__file__).resolve().parents[2] / "vmspawnd" / "spec" / "wire.py"


def test_wire_module_matches_its_rendering() -> None:
    rendered = render_wire_module()
    if os.environ.get("VMSPAWND_REGENERATE"):
        WIRE_MODULE.write_text(rendered)
    assert WIRE_MODULE.read_text() == rendered


def test_machine_json_names_every_key_of_a_record_reply() -> None:
    """A Machine reply is `MachineRecord.to_json()` as is (manager_api's fast path): the keys
    vmspawnctl reads through MachineJson are exactly the keys the record writes."""
    record = MachineRecord(name="m", id="00000000", uid=0, spec={"linux": "/k"})
    record.qemu = ProcessRecord(1, 2, "boot")
    reply = record.to_json()
    assert set(reply) == set(wire.MachineJson.__annotations__)
    assert set(typing.cast(dict[str, object], reply["qemu"])) == set(wire.ProcessJson.__annotations__)
