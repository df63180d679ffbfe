# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the daemon knows about one VM: its state machine and its persisted record.

Pure data. `MachineRecord` is both what `Describe` returns and what goes to
`machines/ID/state.json`, so a restarted daemon sees exactly what clients saw.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Mapping
from typing import Any

from vmspawnd.errors import to_camel

STATE_FORMAT_VERSION = 1


class MachineState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (MachineState.STOPPED, MachineState.FAILED)

    @property
    def is_active(self) -> bool:
        """QEMU may be running: a poweroff or kill makes sense."""
        return self in (MachineState.STARTING, MachineState.RUNNING, MachineState.READY)


# Which transitions the state machine allows; anything else is a bug, not a client error.
TRANSITIONS: dict[MachineState, frozenset[MachineState]] = {
    MachineState.STARTING: frozenset({MachineState.RUNNING, MachineState.STOPPING, MachineState.FAILED}),
    MachineState.RUNNING: frozenset({MachineState.READY, MachineState.STOPPING, MachineState.STOPPED, MachineState.FAILED}),
    MachineState.READY: frozenset({MachineState.STOPPING, MachineState.STOPPED, MachineState.FAILED}),
    MachineState.STOPPING: frozenset({MachineState.STOPPED, MachineState.FAILED}),
    MachineState.STOPPED: frozenset(),
    MachineState.FAILED: frozenset(),
}


@dataclasses.dataclass
class ProcessRecord:
    """Enough to find a process again after a daemon restart: pid + start time + boot."""

    pid: int
    start_time: int  # /proc/PID/stat field 22, clock ticks since boot
    boot_id: str

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "startTime": self.start_time, "bootId": self.boot_id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """From decoded JSON (a state file): its values are whatever the file holds."""
        return cls(int(data["pid"]), int(data["startTime"]), str(data["bootId"]))


@dataclasses.dataclass
class MachineRecord:
    """The daemon's view of one VM, as `Describe` reports it and state.json keeps it."""

    name: str
    id: str
    uid: int
    spec: dict[str, object]
    state: MachineState = MachineState.STARTING
    timestamps: dict[str, int] = dataclasses.field(default_factory=dict)
    qemu: ProcessRecord | None = None
    reaper: ProcessRecord | None = None  # QEMU's parent, which records its exit status
    qmp_address: str = ""
    console_address: str = ""
    console_log: str = ""
    display_address: str = ""  # --console=gui without a window: the VNC socket a viewer opens
    runtime_directory: str = ""
    exit_code: int | None = None
    exit_signal: int | None = None
    reason: str = ""
    stderr_tail: str = ""
    ready: bool = False
    paused: bool = False
    helpers: dict[str, ProcessRecord] = dataclasses.field(default_factory=dict)
    ssh_private_key_path: str = ""  # the ephemeral key (--pass-ssh-key), deleted when the VM ends
    control_address: str = ""  # io.systemd.MachineInstance socket of this VM
    notify_address: str = ""  # where the guest's systemd reports READY/STATUS/EXIT_STATUS; "" if nowhere
    readiness: str = ""  # what "ready" means for this VM: "guest" (READY=1) or why running counts as ready
    status_text: str = ""  # the guest's last STATUS=
    exit_status: int | None = None  # the guest's EXIT_STATUS=, if it sent one
    unit: str = ""  # the systemd unit holding every process of the VM: its scope, or the caller's (--keep-unit)
    registered: bool = False  # with systemd-machined (a restarted daemon registers it again)

    def enter(self, state: MachineState) -> None:
        """Move to `state`, stamping the time (µs since the epoch, as systemd does)."""
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise AssertionError(f"{self.name}: bad transition {self.state} -> {state}")
        self.state = state
        self.timestamps[state.value] = time.time_ns() // 1000

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ProcessRecord):
                value = value.to_json()
            elif f.name == "helpers":
                value = {k: v.to_json() for k, v in value.items()}
            elif isinstance(value, MachineState):
                value = value.value
            out[to_camel(f.name)] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MachineRecord:
        """From decoded JSON (state.json's `machine`), as `to_json` wrote it."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = to_camel(f.name)
            if key not in data:
                continue
            value = data[key]
            if f.name in ("qemu", "reaper") and value is not None:
                value = ProcessRecord.from_json(value)
            elif f.name == "helpers":
                value = {k: ProcessRecord.from_json(v) for k, v in value.items()}
            elif f.name == "state":
                value = MachineState(str(value))
            kwargs[f.name] = value
        return cls(**kwargs)


SNAPSHOT_FORMAT_VERSION = 1


@dataclasses.dataclass
class SnapshotRecord:
    """One snapshot bundle, as `ListSnapshots` reports it and its bundle.json keeps it."""

    name: str  # the bundle's name in the daemon's store, or its directory's name (--output)
    path: str  # the bundle directory
    machine: str  # the VM it was taken of
    created: int  # µs since the epoch
    qemu_version: str  # QEMU's query-version of the source: a clone's QEMU must be the same
    ram: int  # the guest's memory in bytes
    state_size: int  # bytes of saved device and memory state
    disk_size: int  # bytes the frozen disk takes on the host (0 without a disk)
    spec: dict[str, object]  # the source's VmSpec JSON: what a clone starts from
    argv: list[str]  # the source's QEMU argv, normalized (snapshot_config.normalize_argv)
    disk_device: str  # the source's guest-visible disk device ("" without a disk)
    save_seconds: float  # how long QEMU took to write the state

    def to_json(self) -> dict[str, object]:
        return {to_camel(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SnapshotRecord:
        """From a bundle.json: unknown keys (a newer daemon's) are ignored."""
        known = {to_camel(f.name): f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {known[k]: v for k, v in data.items() if k in known}
        return cls(**values)
