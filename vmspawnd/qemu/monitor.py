# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon's QMP link to one VM's QEMU, kept up for as long as QEMU lives.

A `QmpSession` (qmp.py) is one connection; the monitor is the VM's view of it. It connects
on the socket the daemon bound for QEMU, reconnects when the connection drops while QEMU
still runs (QEMU's monitor takes a new client once the old one is gone), and runs commands
on behalf of clients with QEMU's refusals turned into `InvalidState` naming the operation.
Whether QEMU is exiting, and what the VM's state is, are the machine's: the monitor asks
through the callables it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from vmspawnd.errors import InvalidState, NotConnected, Timeout
from vmspawnd.qemu.qmp import DEFAULT_COMMAND_TIMEOUT, EventCallback, QmpError, QmpSession
from vmspawnd.tasks import TaskOwner

_log = logging.getLogger(__name__)

EXIT_GRACE = 1.0  # after QMP drops: is QEMU exiting (normal) or did only the connection die?

# Notices for the machine's event stream: ("QmpDisconnected", {}), ("QmpReconnected", {"status": …}).
NoticeCallback = Callable[[str, dict[str, object]], None]


class QemuMonitor:
    """QMP for one VM: connect, reconnect while QEMU runs, run clients' commands."""

    def __init__(
        self,
        name: str,
        path: Path,
        on_event: EventCallback,
        on_notice: NoticeCallback,
        qemu_exits_within: Callable[[float], Awaitable[bool]],
        is_active: Callable[[], bool],
        tasks: TaskOwner,
    ) -> None:
        self._name = name
        self._path = path
        self._on_event = on_event
        self._on_notice = on_notice
        self._qemu_exits_within = qemu_exits_within
        self._is_active = is_active
        self._tasks = tasks
        self._session: QmpSession | None = None

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.connected

    def _new_session(self) -> QmpSession:
        return QmpSession(self._name, self._on_event, self._on_disconnect)

    async def connect(self) -> None:
        """Connect for the first time (Timeout / NotConnected when QEMU does not answer)."""
        session = self._new_session()
        try:
            await session.connect(str(self._path))
        except BaseException:
            await session.close()
            raise
        self._session = session

    async def reconnect(self) -> dict[str, object]:
        """Connect to a QEMU that runs already (a restart, a dropped link); QEMU's status."""
        session = self._new_session()
        try:
            await session.connect(str(self._path))
            status = await session.query_status()
        except BaseException:
            await session.close()
            raise
        self._session = session
        return status

    def _on_disconnect(self) -> None:
        if self._is_active():
            self._tasks.spawn(self._recover(), "reconnect QMP")

    async def _recover(self) -> None:
        if await self._qemu_exits_within(EXIT_GRACE):
            return  # QEMU was exiting: the supervisor records that
        _log.warning("%s: QMP connection lost while QEMU runs; reconnecting", self._name)
        self._on_notice("QmpDisconnected", {})
        await self.close()
        try:
            status = await self.reconnect()
        except (Timeout, NotConnected) as exc:
            _log.error("%s: QMP reconnect failed (%s); lifecycle calls will answer NotConnected", self._name, exc)
            return
        # STOP/RESUME of the time without a link are lost: the status says where QEMU is.
        self._on_notice("QmpReconnected", {"status": status.get("status")})
        _log.info("%s: QMP reconnected", self._name)

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = DEFAULT_COMMAND_TIMEOUT
    ) -> object:
        """One bounded command; NotConnected without a link, QmpError if QEMU refuses."""
        if self._session is None:
            raise NotConnected(self._name)
        return await self._session.execute(command, arguments, timeout)

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU an open file under `name` (QmpSession.pass_fd)."""
        if self._session is None:
            raise NotConnected(self._name)
        await self._session.pass_fd(fd, name)

    async def add_fd(self, fd: int, opaque: str) -> int:
        """Give QEMU an open file in a new fd set; its id (QmpSession.add_fd)."""
        if self._session is None:
            raise NotConnected(self._name)
        return await self._session.add_fd(fd, opaque)

    async def request(self, operation: str, state: str, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """A client's command: QEMU's refusal is InvalidState naming `operation`."""
        if not self.connected:
            raise NotConnected(self._name)
        try:
            return await self.execute(command, arguments)
        except QmpError as exc:
            raise InvalidState(self._name, state, f"{operation} ({exc})") from exc

    async def query_status(self) -> dict[str, object]:
        if self._session is None or not self._session.connected:
            raise NotConnected(self._name)
        return await self._session.query_status()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
