# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest → host notify channel (systemd's `vmm.notify_socket`).

The guest's systemd connects once per message, writes `KEY=VALUE` lines and closes
(docs/reference/systemd-vmspawn.md §4). We accept every connection, read it to EOF with a size cap,
and hand the parsed fields to a callback. Oversized or malformed messages are dropped
with a log line and change nothing.

The listener is AF_VSOCK (the guest gets `vsock-stream:2:PORT` as a credential). Where no
vsock device exists (as on the development machines) the daemon can listen on AF_UNIX
instead (`--notify-transport=unix`): nothing in a guest can reach that, but tests and local
tools write to it exactly what a guest's systemd would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

_log = logging.getLogger(__name__)

NOTIFY_BUFFER_MAX = 4096  # systemd's NOTIFY_BUFFER_MAX
READ_TIMEOUT = 10.0
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2

MessageCallback = Callable[[dict[str, str]], None]


class MalformedMessage(ValueError):
    pass


def parse_notify_message(data: bytes) -> dict[str, str]:
    """Split a notify message into fields, as sd_notify's receivers do.

    Lines are separated by newlines (vmspawn also accepts CR); empty lines are skipped;
    a line without `=` or a message that is not UTF-8 makes the whole message malformed.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("not UTF-8") from None
    fields: dict[str, str] = {}
    for line in text.replace("\r", "\n").split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise MalformedMessage(f"line without KEY=VALUE: {line[:40]!r}")
        fields[key] = value
    if not fields:
        raise MalformedMessage("empty message")
    return fields


def parse_exit_status(value: str) -> int | None:
    """EXIT_STATUS= as vmspawn 258+: a uint8; anything else is ignored (None)."""
    if not value.isdigit():
        return None
    number = int(value)
    return number if 0 <= number <= 255 else None


class NotifyListener:
    """Accepts notify connections for one VM and reports each parsed message."""

    def __init__(self, sock: socket.socket, address: str, on_message: MessageCallback, name: str) -> None:
        self._sock = sock
        self.address = address
        self._on_message = on_message
        self._name = name
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                data = await reader.read(NOTIFY_BUFFER_MAX + 1)
                while len(data) <= NOTIFY_BUFFER_MAX:
                    chunk = await reader.read(NOTIFY_BUFFER_MAX + 1 - len(data))
                    if not chunk:
                        break
                    data += chunk
            if len(data) > NOTIFY_BUFFER_MAX:
                _log.warning("%s: notify message exceeded %d bytes, dropped", self._name, NOTIFY_BUFFER_MAX)
                return
            self._on_message(parse_notify_message(data))
        except MalformedMessage as exc:
            _log.warning("%s: malformed notify message dropped: %s", self._name, exc)
        except TimeoutError:
            _log.warning("%s: notify connection sent nothing to EOF within %.0fs, dropped", self._name, READ_TIMEOUT)
        except (ConnectionError, OSError) as exc:
            _log.debug("%s: notify connection failed: %s", self._name, exc)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sock.close()


def open_vsock_listener(port: int = VMADDR_PORT_ANY) -> tuple[socket.socket, str]:
    """AF_VSOCK listener on any CID, a kernel-chosen port (or `port`, to come back on the
    address a running guest already knows after a daemon restart)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((VMADDR_CID_ANY, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        _cid, port = sock.getsockname()
    except BaseException:
        sock.close()
        raise
    return sock, f"vsock-stream:{VMADDR_CID_HOST}:{port}"


def open_unix_listener(path: Path) -> tuple[socket.socket, str]:
    """The AF_UNIX stand-in for hosts without vsock (tests, development)."""
    from vmspawnd.runtime_dir import bind_listening_socket

    sock = bind_listening_socket(path, 0o600)
    sock.setblocking(False)
    return sock, f"unix:{path}"


def reopen_listener(address: str, unix_path: Path) -> tuple[socket.socket, str]:
    """Listen again on the address recorded before a daemon restart."""
    if address.startswith("unix:"):
        return open_unix_listener(unix_path)
    if address.startswith("vsock-stream:"):
        return open_vsock_listener(int(address.rsplit(":", 1)[1]))
    raise ValueError(f"unknown notify address {address!r}")
