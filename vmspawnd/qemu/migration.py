# SPDX-License-Identifier: LGPL-2.1-or-later
"""Save a VM's state to a file and load it into a new QEMU, over QMP.

A QEMU that runs unprivileged under `-sandbox on,spawn=deny` can neither fork (`exec:cat >
FILE`) nor open the daemon's paths. So the daemon opens the state file itself and hands
QEMU the open fd: by name for QEMU 7.2 (`getfd`, `fd:NAME`; it has no `file:` URI), in an
fd set for QEMU 9.0+ (`add-fd`, `file:/dev/fdset/N`: forky's QEMU 10 refuses `fd:` on a
file). The end of a migration is QEMU's MIGRATION event (capability `events`), awaited
on the VM's event stream; a failure is read back from `query-migrate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from vmspawnd.control import QmpEvent, SubscribeQmp, next_event
from vmspawnd.errors import NotConnected, Timeout
from vmspawnd.qemu.monitor import QemuMonitor
from vmspawnd.qemu.qmp import QmpError

FD_NAME = "vmspawnd-state"
MAX_BANDWIDTH = 1 << 40  # bytes/s: the default (128 MiB/s) is for live links, not a local file
DEFAULT_TIMEOUT = 300.0  # a 16 GiB guest written at ~1 GB/s, with room
END_STATES = ("completed", "failed", "cancelled")
FILE_URI_SINCE = 9  # QEMU's first major version whose `file:` URI takes /dev/fdset/N


class MigrationFailed(Exception):
    """QEMU reported the migration failed (its error-desc) or it never ended."""


async def qemu_version(monitor: QemuMonitor) -> str:
    """QEMU's own version (`query-version`: qemu major.minor.micro and the package)."""
    reply = await monitor.execute("query-version")
    assert isinstance(reply, dict)
    qemu = reply.get("qemu", {})
    package = str(reply.get("package", "")).strip()
    numbers = f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}" if isinstance(qemu, dict) else "?"
    return f"{numbers} {package}".strip()


async def _enable_events(monitor: QemuMonitor) -> None:
    await monitor.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})


async def _wait_end(monitor: QemuMonitor, queue: asyncio.Queue[QmpEvent], timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            data = await next_event(queue, "MIGRATION", lambda d: d.get("status") in END_STATES)
    except TimeoutError:
        raise Timeout(f"migration did not end within {timeout:g}s") from None
    if data is None:
        raise MigrationFailed("QEMU went away during the migration")
    status = data["status"]
    if status != "completed":
        info = await monitor.execute("query-migrate")
        detail = info.get("error-desc", status) if isinstance(info, dict) else status
        raise MigrationFailed(str(detail))


@contextlib.asynccontextmanager
async def _state_channel(monitor: QemuMonitor, fd: int, path: Path) -> AsyncIterator[str]:
    """The migration URI of the daemon-opened state file `fd`, handed to QEMU for the block
    (and closed here once QEMU has it).

    QEMU 7.2 has no `file:` URI, so the fd goes by name (`getfd`, `fd:NAME`; QEMU closes
    it when the migration ends). QEMU 9.0 and later take `file:` on an fd set, and newer
    ones refuse `fd:` on a regular file ("fd: migration to a file is not supported"), so
    there the fd goes into a set of its own (`add-fd`, `file:/dev/fdset/N`), removed after.
    """
    try:
        if await _major_version(monitor) < FILE_URI_SINCE:
            await monitor.pass_fd(fd, FD_NAME)
            fdset = None
        else:
            fdset = await monitor.add_fd(fd, str(path))
    finally:
        os.close(fd)  # QEMU holds its own copy now
    if fdset is None:
        yield f"fd:{FD_NAME}"
        return
    try:
        yield f"file:/dev/fdset/{fdset}"
    finally:
        with contextlib.suppress(QmpError, NotConnected):
            await monitor.execute("remove-fd", {"fdset-id": fdset})


async def _major_version(monitor: QemuMonitor) -> int:
    reply = await monitor.execute("query-version")
    qemu = reply.get("qemu", {}) if isinstance(reply, dict) else {}
    return int(qemu.get("major", 0)) if isinstance(qemu, dict) else 0


async def save_state(monitor: QemuMonitor, subscribe: SubscribeQmp, path: Path, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Write the (paused) VM's state to a new file at `path` (0600); the seconds QEMU took.

    The VM must be paused already: then the state is one consistent point in time, and
    QEMU ends in `postmigrate`, from which `cont` resumes it.
    """
    await _enable_events(monitor)
    await monitor.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    async with _state_channel(monitor, fd, path) as uri:
        with subscribe() as queue:
            started = time.monotonic()
            await monitor.execute("migrate", {"uri": uri})
            await _wait_end(monitor, queue, timeout)
    return time.monotonic() - started


async def load_state(monitor: QemuMonitor, subscribe: SubscribeQmp, path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Load the state at `path` into a QEMU started with `-incoming defer` (and `-S`: it
    stays paused afterwards, for the caller's `cont`)."""
    await _enable_events(monitor)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    async with _state_channel(monitor, fd, path) as uri:
        with subscribe() as queue:
            await monitor.execute("migrate-incoming", {"uri": uri})
            try:
                await _wait_end(monitor, queue, timeout)
            except NotConnected:
                raise MigrationFailed("QEMU closed its monitor while loading the state") from None
