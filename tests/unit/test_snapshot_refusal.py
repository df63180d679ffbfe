# SPDX-License-Identifier: LGPL-2.1-or-later
"""A VM with virtiofs shares is refused a snapshot before anything is touched.

Seam test with a stand-in for Machine (booting a VM with virtiofsd costs a VM slot for a
check that happens before any I/O): the stand-in records every call, and the refusal must
come with none made and the bundle directory left as it was.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmspawnd.errors import SnapshotIncompatible
from vmspawnd.model import MachineRecord, MachineState
from vmspawnd.snapshot import take_snapshot


class SharingMachine:
    """Only what take_snapshot reads before it refuses; any action is recorded."""

    def __init__(self, spec: dict[str, object]) -> None:
        self.name = "shared"
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
def test_virtiofs_vm_is_refused_before_anything_happens(tmp_path: Path, spec: dict[str, object], named: list[str]) -> None:
    machine = SharingMachine(spec)
    with pytest.raises(SnapshotIncompatible) as refused:
        asyncio.run(take_snapshot(machine, tmp_path, "b", stop=False))  # type: ignore[arg-type]
    assert refused.value.options == named and "virtiofs" in refused.value.reason
    assert machine.calls == [] and list(tmp_path.iterdir()) == []
