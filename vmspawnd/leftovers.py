# SPDX-License-Identifier: LGPL-2.1-or-later
"""What a VM leaves: the files that end with its QEMU, and what an earlier daemon left that
this one cannot adopt (stopped and deleted).

A VM directory whose state.json is unreadable, of another format version, or names a
machine already adopted from another record must not keep running unsupervised: its
processes are stopped (only those still the same processes), then the directory goes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from vmspawnd import state_seal
from vmspawnd.host.process import ChildProcess, children_of, is_same_process, processes_mentioning
from vmspawnd.model import ProcessRecord
from vmspawnd.runtime_dir import VmPaths, read_json

_log = logging.getLogger("vmspawnd.machine")  # these lines are about a machine

TERM_GRACE = 5.0  # as a VM's own stop: SIGTERM, then SIGKILL after this long


async def discard_leftovers(directory: Path) -> None:
    """Stop what a record we cannot use still names (same processes only), then delete it.

    Used for unreadable or other-version state: parse what can be parsed, best effort.
    """
    try:
        # A state.json the daemon did not write names no process to stop (state_seal).
        data = read_json(VmPaths(directory).state) if state_seal.trusted_state(directory) else {}
        machine = data.get("machine", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        machine = {}
    records = []
    for key in ("qemu", "reaper"):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            records.append(ProcessRecord.from_json(machine[key]))
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
        records.extend(ProcessRecord.from_json(v) for v in machine["helpers"].values())
    for record in records:
        if is_same_process(record):
            process = ChildProcess("leftover", record.pid, None)
            await process.terminate(TERM_GRACE)
    # A garbled record names no process; the VM's reaper and helpers still name the VM's
    # directory on their command lines (status file, sockets, state): stop those, children first.
    for pid in processes_mentioning(directory):
        for child in [*children_of(pid), pid]:
            with contextlib.suppress(ProcessLookupError):
                await ChildProcess("leftover", child, None).terminate(TERM_GRACE)
    shutil.rmtree(directory, ignore_errors=True)
    state_seal.remove_seal(directory)


def remove_transient_files(paths: VmPaths, name: str) -> None:
    """Sockets and temporary files die with QEMU; the record, logs and history stay.

    A failing filesystem (full, read-only, immutable) must not keep the VM from being
    recorded as ended: failures are logged, and Remove deletes the directory later.
    """
    for leftover in paths.transient():
        try:
            leftover.unlink(missing_ok=True)
        except OSError as exc:
            _log.error("%s: could not remove %s: %s", name, leftover, exc.strerror)
    # credentials (keys) end with the VM, as vmspawn's SMBIOS directory
    shutil.rmtree(paths.payload, onerror=lambda _f, path, exc: _log.error("%s: could not remove %s: %s", name, path, exc[1]))
