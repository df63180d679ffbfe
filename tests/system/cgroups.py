# SPDX-License-Identifier: LGPL-2.1-or-later
"""The cgroups a test container runs in.

The host's PID 1 is no systemd here: nothing delegates a cgroup to us, so each container
gets a group of its own, made by hand, under ``vmspawnd-tests/`` in the cgroup2 mount (and in
the named v1 hierarchy ``name=systemd`` on hybrid hosts, where nspawn also looks):

    vmspawnd-tests/NAME-PID/nspawn   systemd-nspawn; it makes payload/ and supervisor/ below
    vmspawnd-tests/NAME-PID/exec     everything entered with nsenter (Container.run)

so that killing ``NAME-PID`` (cgroup.kill) ends everything the container ever ran, and PID
(the pytest process) tells a later run which groups a killed run left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from pathlib import Path

from tests.system.hostenv import CgroupLayout

TOP = "vmspawnd-tests"


def group_name(name: str, owner: int | None = None) -> str:
    return f"{name}-{os.getpid() if owner is None else owner}"


def make(layout: CgroupLayout, name: str) -> tuple[Path, Path | None]:
    """Create the container's groups; returns (cgroup2 group, v1 named group or None)."""
    unified = layout.unified / TOP / group_name(name)
    for sub in ("nspawn", "exec"):
        (unified / sub).mkdir(parents=True, exist_ok=True)
    named = None
    if layout.named_v1 is not None:
        named = layout.named_v1 / TOP / group_name(name)
        named.mkdir(parents=True, exist_ok=True)
    return unified, named


def kill(group: Path) -> None:
    """SIGKILL every process in `group` and below. cgroup.kill does it atomically (no fork can
    escape); older kernels get a loop over cgroup.procs instead."""
    if not group.exists():
        return
    if (group / "cgroup.kill").exists():
        (group / "cgroup.kill").write_text("1")
        return
    for _ in range(100):
        pids = procs(group)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def procs(group: Path) -> list[int]:
    """The processes in `group` and every group below it."""
    found: list[int] = []
    for directory, _, _ in os.walk(group):
        with contextlib.suppress(FileNotFoundError):
            found += [int(p) for p in (Path(directory) / "cgroup.procs").read_text().split()]
    return found


def wait_empty(group: Path, timeout: float) -> bool:
    """Wait until no process is left in `group` (cgroup2: `populated 0` in cgroup.events,
    which the kernel signals with POLLPRI, so this does not spin); True if it emptied."""
    events = group / "cgroup.events"
    deadline = time.monotonic() + timeout
    if not events.exists():
        # A v1 group: no events file; its emptiness follows the cgroup2 group's, checked first.
        while procs(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not procs(group)
    with open(events, "rb", buffering=0) as f:
        poller = select.poll()
        poller.register(f, select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            if b"populated 0" in f.read():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)


def remove(group: Path) -> None:
    """rmdir `group` depth-first (a cgroup directory with children cannot be removed)."""
    if not group.exists():
        return
    for directory, _, _ in os.walk(group, topdown=False):
        for attempt in range(50):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY for a moment after the last process is gone (it is still being freed).
                if exc.errno != errno.EBUSY or attempt == 49:
                    raise
                time.sleep(0.02)
    # The shared parent goes too once no container of any run uses it.
    with contextlib.suppress(OSError):
        os.rmdir(group.parent)


def stale(layout: CgroupLayout) -> list[Path]:
    """Groups whose owning test process is gone (killed before its teardown ran)."""
    found = []
    for top in (layout.unified / TOP, *([layout.named_v1 / TOP] if layout.named_v1 else [])):
        if not top.is_dir():
            continue
        for group in top.iterdir():
            owner = group.name.rpartition("-")[2]
            if group.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
                found.append(group)
    return found


def reap_stale(layout: CgroupLayout) -> list[Path]:
    """Kill what a killed earlier run left in its groups, and remove the groups."""
    groups = stale(layout)
    for group in groups:
        kill(group)
    for group in groups:
        wait_empty(group, 10)
        with contextlib.suppress(OSError):
            remove(group)
    return groups
