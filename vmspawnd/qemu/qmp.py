# SPDX-License-Identifier: LGPL-2.1-or-later
"""The one place that speaks QMP, on top of qemu.qmp.

Every command has a timeout (a wedged QEMU must never hang a caller), errors become
vmspawnd errors, and events are drained into a callback by a task this session owns.
qemu.qmp's always-registered `events` listener keeps a history of every event it ever
saw (docs/reference/libraries.md §2): the pump empties it so a month-long VM does not grow memory.
Never import qemu.qmp.legacy (GPLv2-only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError

from vmspawnd.errors import NotConnected, Timeout

_log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 10.0

EventCallback = Callable[[str, dict[str, object]], None]


class QmpError(Exception):
    """QEMU answered a command with an error (QMP error class and description)."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"{command}: {error_class}: {description}")
        self.error_class = error_class


class QmpSession:
    """A connected QMP session to one QEMU, owned by one Machine."""

    def __init__(self, machine_name: str, on_event: EventCallback, on_disconnect: Callable[[], None] | None = None) -> None:
        self._name = machine_name
        self._client = QMPClient(machine_name)
        self._on_event = on_event
        self._on_disconnect = on_disconnect
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    async def connect(self, path: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Connect to QEMU's QMP socket; bounded, because a second client is never greeted."""
        try:
            async with asyncio.timeout(timeout):
                await self._client.connect(path)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self._client.disconnect()
            raise Timeout(f"QMP connect to {self._name}") from None
        except ConnectError as exc:
            raise NotConnected(self._name) from exc
        self._pump = asyncio.create_task(self._pump_events(), name=f"qmp-events-{self._name}")
        self._watch = asyncio.create_task(self._watch_connection(), name=f"qmp-watch-{self._name}")

    async def _watch_connection(self) -> None:
        """Tell the owner when the connection drops by itself (not through close())."""
        while self.connected:
            await self._client.runstate_changed()
        if not self._closing and self._on_disconnect is not None:
            self._on_disconnect()

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> object:
        """Run one command; Timeout if QEMU does not answer in time, NotConnected if gone."""
        if not self.connected:
            raise NotConnected(self._name)
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, arguments)
        except TimeoutError:
            raise Timeout(f"QMP {command} on {self._name}") from None
        except ExecuteError as exc:
            raise QmpError(command, exc.error_class, str(exc)) from exc
        except (ExecInterruptedError, StateError, EOFError, ConnectionError) as exc:
            raise NotConnected(self._name) from exc

    async def pass_fd(self, fd: int, name: str, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        """Hand QEMU an open file as `name` (SCM_RIGHTS, then getfd): how a daemon-opened
        file reaches a QEMU that may open no path itself (migration's `fd:NAME`)."""
        if not self.connected:
            raise NotConnected(self._name)
        self._client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name}, timeout)

    async def add_fd(self, fd: int, opaque: str, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> int:
        """Hand QEMU an open file in a new fd set (SCM_RIGHTS, then add-fd); the set's id,
        for a `/dev/fdset/N` path QEMU then opens by dup (migration's `file:` URI)."""
        if not self.connected:
            raise NotConnected(self._name)
        self._client.send_fd_scm(fd)
        reply = await self.execute("add-fd", {"opaque": opaque}, timeout)
        assert isinstance(reply, dict)
        return int(reply["fdset-id"])

    async def query_status(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> dict[str, object]:
        result = await self.execute("query-status", timeout=timeout)
        assert isinstance(result, dict)
        return result

    async def _pump_events(self) -> None:
        events = self._client.events
        try:
            async for event in events:
                # Only the history: clear() would also drop the events still queued behind
                # this one (a STOP and RESUME that arrive together lost the RESUME).
                events._history.clear()  # noqa: SLF001 — unbounded otherwise (docs/reference/libraries.md §2)
                name = str(event["event"])
                data = event.get("data") or {}
                try:
                    # qemu.qmp types a Message's values as object; QMP's `data` is always a JSON object.
                    self._on_event(name, dict(data))  # type: ignore[call-overload]
                except Exception:
                    _log.exception("%s: event handler failed for %s", self._name, name)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.debug("%s: QMP event pump ended", self._name, exc_info=True)

    async def close(self) -> None:
        """Disconnect; qemu.qmp re-raises the reason a session died, which is no news here."""
        self._closing = True
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        with contextlib.suppress(Exception):
            await self._client.disconnect()
