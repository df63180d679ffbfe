# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fixtures of the component tier: the daemon's lifecycle code in this process, QEMU
played by tests/fakes/fake_qemu.py (first in $PATH), no guest and no systemd.

`new_machine` is the one place that knows how a Machine is constructed; everything else
talks to Machine and Manager through their public methods, so that moving code between
modules does not touch these tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import fake_vm_spec, install_fake_qemu
from tests.support import children_of, kill_leftovers, process_state
from vmspawnd.host.peer import owner_only
from vmspawnd.machine import Machine
from vmspawnd.model import MachineRecord, MachineState
from vmspawnd.runtime_dir import new_machine_id
from vmspawnd.settings import Settings
from vmspawnd.spec import VmSpec
from vmspawnd.varlink.machine_instance import machine_instance_servers

# The real control socket (io.systemd.MachineInstance), as the daemon serves it.
SERVE_CONTROL = machine_instance_servers(owner_only)
SETTINGS = Settings(gui_window=False, serve_control=SERVE_CONTROL)


class EventLog:
    """Records what a Machine or Manager publishes; tests await an event instead of sleeping."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []
        self._changed = asyncio.Event()

    def __call__(self, _machine: object, event: str, data: dict[str, object]) -> None:
        self.seen.append((event, data))
        self._changed.set()

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]

    def states(self) -> list[str]:
        return [str(data["state"]) for name, data in self.seen if name == "StateChanged"]

    async def wait_for(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        """The first `event` seen (now or later), or TimeoutError."""
        async with asyncio.timeout(timeout):
            while True:
                for name, data in self.seen:
                    if name == event:
                        return data
                self._changed.clear()
                await self._changed.wait()


def state_of(machine: Machine) -> MachineState:
    """The state now: it changes across awaits, which a type checker's narrowing of an
    earlier `assert machine.record.state is ...` does not know."""
    return machine.record.state


@dataclasses.dataclass
class FakeHost:
    """A private root (short: socket paths stay under 108 bytes) with the fake QEMU in $PATH."""

    root: Path
    bin_dir: Path

    @property
    def machines_dir(self) -> Path:
        return self.root / "machines"

    def spec(self, name: str, *faults: str, **fields: object) -> dict[str, object]:
        return fake_vm_spec(self.root, name, *faults, **fields)

    def new_machine(self, spec_json: dict[str, object], settings: Settings = SETTINGS) -> tuple[Machine, EventLog]:
        """A Machine as Manager.spawn makes one (record in STARTING), not yet started."""
        spec = VmSpec.from_json(spec_json)
        record = MachineRecord(name=spec.machine_name(), id=new_machine_id(), uid=os.geteuid(), spec=spec.to_json())
        record.enter(MachineState.STARTING)
        events = EventLog()
        return Machine(record, spec, self.machines_dir / record.id, events, settings), events

    def processes(self) -> list[int]:
        """Running processes that name this root on their command line: reapers, fake QEMUs."""
        needle = os.fsencode(f"{self.root}/")
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if needle in Path(f"/proc/{entry}/cmdline").read_bytes() and process_state(int(entry)) != "Z":
                        found.append(int(entry))
                except OSError:
                    pass
        return found


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHost]:
    """The fake QEMU first in $PATH, no systemd and no machined, and at the end the check
    that nothing of the test still runs."""
    root = Path(tempfile.mkdtemp(prefix="vmspawnd-fake-", dir="/tmp"))
    bin_dir = root / "bin"
    install_fake_qemu(bin_dir)
    (root / "machines").mkdir(mode=0o700)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    monkeypatch.setenv("VMSPAWND_SYSTEMD_BOOTED", "0")
    monkeypatch.setenv("VMSPAWND_MACHINED_ADDRESS", str(root / "no-machined-here"))
    children = set(children_of(os.getpid()))
    try:
        yield FakeHost(root, bin_dir)
    finally:
        left = kill_leftovers(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes of the test still ran at its end: {left}"
    assert set(children_of(os.getpid())) <= children, "children of the test were not reaped"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path (AF_UNIX socket paths end at 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vmspawnd-c-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def open_fds() -> list[str]:
    """This process's open files, by target: a start that unwinds must leave them as they were."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass  # the directory's own fd, closed again
    return sorted(found)


__all__ = ["SERVE_CONTROL", "SETTINGS", "EventLog", "FakeHost", "fake_host", "open_fds", "short_tmp", "state_of"]
