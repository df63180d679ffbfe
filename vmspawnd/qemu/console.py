# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon's side of a VM's console: one connection to QEMU, many clients.

QEMU's console chardev accepts one client at a time, so the daemon is that client
(a `ConsoleHub` per VM) and fans the stream out itself:

* history is QEMU's own `logfile=` (`console.log`): QEMU logs every byte the guest
  writes, also while the daemon is gone (a restart) or behind (QEMU drops console
  output it cannot write to a full socket, but still logs it), so history is complete
  and costs the daemon no memory. QEMU cannot rotate it; the daemon does (`History`),
  keeping console.log + console.log.1 under 2 MiB while it runs;
* each client gets one end of a socketpair (handed over by Varlink fd passing);
  any number of read-only watchers, at most one interactive writer (a second one
  is refused with ConsoleBusy unless it forces, which detaches the first with a
  message);
* every client has a bounded output buffer: a client that does not read is
  disconnected with a message instead of stalling the VM or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
from pathlib import Path

from vmspawnd.errors import ConsoleBusy, NotConnected
from vmspawnd.runtime_dir import replace_private_file

_log = logging.getLogger(__name__)

HISTORY_CAP = 1024 * 1024  # per file; console.log + console.log.1 ≤ 2 MiB
CLIENT_BUFFER = 256 * 1024  # bytes a client may lag behind before it is dropped
READ_CHUNK = 65536
DRAIN_TIMEOUT = 2.0

SLOW_MESSAGE = b"\r\n[vmspawnd: this console client was too slow and has been disconnected]\r\n"
TAKEN_OVER_MESSAGE = b"\r\n[vmspawnd: another client took over this console (--force); detached]\r\n"


class AttachMode(enum.StrEnum):
    INTERACTIVE = "interactive"
    READ_ONLY = "read-only"


class History:
    """Keeps QEMU's console logfile under a cap: console.log rotates to console.log.1.

    QEMU appends (`logappend=on`, O_APPEND) and never reopens the file, so the daemon
    rotates as logrotate's `copytruncate` does: copy the file to console.log.1, then
    truncate it; QEMU's next write lands at the new end. Bytes QEMU logs between the
    last read of the copy and the truncate (microseconds) are lost. While no daemon runs
    nothing rotates; the first check after an adoption keeps the newest `cap` bytes.
    """

    def __init__(self, path: Path, cap: int = HISTORY_CAP) -> None:
        self.path = path
        self.rotated = path.with_name(path.name + ".1")
        self.cap = cap
        self._fd = self._open(path)  # created if gone: a lost file must not stop an adoption

    @staticmethod
    def _open(path: Path) -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    @classmethod
    def create(cls, path: Path) -> None:
        """An empty private console.log for QEMU to append to (it would create it 0644)."""
        os.close(cls._open(path))

    def rotate_if_full(self) -> None:
        """Called whenever the guest wrote: one fstat, and a rotation past the cap."""
        try:
            size = os.fstat(self._fd).st_size
            if size <= self.cap:
                return
            offset = max(0, size - self.cap)
            chunks = []
            while chunk := os.pread(self._fd, READ_CHUNK, offset):
                chunks.append(chunk)
                offset += len(chunk)
            os.ftruncate(self._fd, 0)
            replace_private_file(self.rotated, b"".join(chunks)[-self.cap :])
        except OSError:
            _log.exception("could not rotate %s", self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_history(log_path: Path, max_bytes: int | None = None) -> bytes:
    """The retained history (console.log.1 then console.log), at most the last `max_bytes`."""
    parts = []
    for path in (log_path.with_name(log_path.name + ".1"), log_path):
        with contextlib.suppress(FileNotFoundError):
            parts.append(path.read_bytes())
    data = b"".join(parts)
    return data if max_bytes is None else data[-max_bytes:] if max_bytes else b""


def last_lines(data: bytes, lines: int | None) -> str:
    text = data.decode("utf-8", errors="replace")
    if lines is None:
        return text
    if lines <= 0:
        return ""
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)


class ConsoleClient:
    """The daemon's end of one client's socketpair, with its bounded output buffer."""

    def __init__(self, hub: ConsoleHub, sock: socket.socket, mode: AttachMode) -> None:
        self.hub = hub
        self.sock = sock
        self.mode = mode
        self._pending = bytearray()
        self._writing = False
        self.closed = False
        loop = asyncio.get_running_loop()
        self._loop = loop
        loop.add_reader(sock, self._on_readable)

    def deliver(self, data: bytes) -> None:
        """Queue output; never blocks. A client that lags CLIENT_BUFFER behind is dropped."""
        if self.closed or not data:
            return
        if not self._pending:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            data = data[sent:]
            if not data:
                return
        if len(self._pending) + len(data) > CLIENT_BUFFER:
            _log.info("%s: dropping a %s console client that stopped reading", self.hub.name, self.mode.value)
            self.close(SLOW_MESSAGE, drop_pending=True)
            return
        self._pending += data
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock, self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._pending)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self._pending[:sent]
        if not self._pending:
            self._writing = False
            self._loop.remove_writer(self.sock)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self.mode is AttachMode.INTERACTIVE and self.hub.writer is self:
            self.hub.send_input(data)
        # Input from read-only watchers is read and dropped, so their end never fills up.

    def close(self, message: bytes = b"", drop_pending: bool = False) -> None:
        """Detach: flush what fits without blocking (plus `message`), then close."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock)
        if self._writing:
            self._loop.remove_writer(self.sock)
        tail = (b"" if drop_pending else bytes(self._pending)) + message
        if tail:
            with contextlib.suppress(OSError):
                self.sock.send(tail)
        self._pending.clear()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.hub.forget(self)


class ConsoleHub:
    """Holds a VM's console connection and history, and serves any number of clients."""

    def __init__(self, name: str, socket_path: Path, log_path: Path) -> None:
        self.name = name
        self.socket_path = socket_path
        self.history = History(log_path)
        self.clients: set[ConsoleClient] = set()
        self.writer: ConsoleClient | None = None
        self._reader: asyncio.StreamReader | None = None
        self._qemu: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self._eof = asyncio.Event()

    async def connect(self, timeout: float = 5.0) -> None:
        """Connect to QEMU's console socket (it listens already: the daemon bound it)."""
        async with asyncio.timeout(timeout):
            self._reader, self._qemu = await asyncio.open_unix_connection(str(self.socket_path))
        self.history.rotate_if_full()  # after a restart: what QEMU logged meanwhile
        self._pump = asyncio.create_task(self._read_guest(), name=f"console-{self.name}")

    async def _read_guest(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(READ_CHUNK):
                self.history.rotate_if_full()
                for client in list(self.clients):
                    client.deliver(data)
        except (ConnectionError, OSError) as exc:
            _log.debug("%s: console connection ended: %s", self.name, exc)
        finally:
            self._eof.set()

    def send_input(self, data: bytes) -> None:
        if self._qemu is not None and not self._qemu.is_closing():
            self._qemu.write(data)

    def open(self, mode: AttachMode, force: bool = False, history: int = 0) -> socket.socket:
        """A new client; returns the caller's end of its socketpair (to pass on)."""
        if self._qemu is None or self._eof.is_set():
            raise NotConnected(self.name)
        if mode is AttachMode.INTERACTIVE and self.writer is not None and not self.writer.closed:
            if not force:
                raise ConsoleBusy(self.name)
            _log.info("%s: interactive console taken over", self.name)
            self.writer.close(TAKEN_OVER_MESSAGE)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        theirs.set_inheritable(False)
        client = ConsoleClient(self, ours, mode)
        self.clients.add(client)
        if mode is AttachMode.INTERACTIVE:
            self.writer = client
        if history > 0:
            client.deliver(read_history(self.history.path, min(history, CLIENT_BUFFER // 2)))
        return theirs

    def forget(self, client: ConsoleClient) -> None:
        self.clients.discard(client)
        if self.writer is client:
            self.writer = None

    async def close(self, drain: bool) -> None:
        """Let go: after QEMU's exit, first pass on what it wrote last (bounded) to the clients."""
        if drain and self._pump is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await self._eof.wait()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        for client in list(self.clients):
            client.close()
        if self._qemu is not None:
            self._qemu.close()
            with contextlib.suppress(Exception):
                await self._qemu.wait_closed()
        self.history.close()
