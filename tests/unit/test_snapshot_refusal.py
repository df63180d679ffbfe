# SPDX-License-Identifier: LGPL-2.1-or-later
"""A VM with virtiofs shares is refused a snapshot before anything is touched.

Seam test with a stand-in for Machine (booting a VM with virtiofsd costs a VM slot for a
check that happens before any I/O): the stand-in records every call, and the refusal must
come with none made. That the Manager makes no bundle directory for a refused VM is
tests/component/test_manager.py's (a paused VM with a network card).
"""

from __future__ import annotations

import pytest

from vmspawnd.errors import SnapshotIncompatible
from vmspawnd.model import MachineRecord, MachineState
from vmspawnd.snapshot import refuse_unless_snapshottable
from vmspawnd.spec import VmSpec


class SharingMachine:
    """Only what take_snapshot reads before it refuses; any action is recorded."""

    def __init__(self, spec: dict[str, object]) -> None:
        self.name = "shared"
        self.spec = VmSpec.from_json(dict(spec, name="shared"))
        self.record = MachineRecord(name="shared", id="x", uid=0, spec=spec, state=MachineState.RUNNING)
        self.calls: list[str] = []

    async def pause(self) -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def terminate(self) -> None:
        self.calls.append("terminate")


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"directory": "/srv/root"}, ["directory"]),
        ({"image": "/i.raw", "binds": [{"source": "/a", "target": "/b", "readOnly": False}]}, ["binds"]),
        ({"image": "/i.raw", "bindUsers": ["alice"]}, ["bindUsers"]),
    ],
)
def test_virtiofs_vm_is_refused_before_anything_happens(spec: dict[str, object], named: list[str]) -> None:
    machine = SharingMachine(spec)
    with pytest.raises(SnapshotIncompatible) as refused:
        refuse_unless_snapshottable(machine, "b")  # type: ignore[arg-type]
    assert refused.value.options == named and "virtiofs" in refused.value.reason
    assert machine.calls == []
