# SPDX-License-Identifier: LGPL-2.1-or-later
"""qemu/console.py's ConsoleHub: one connection to QEMU's console chardev, many clients.

QEMU's side is a plain stream socket this test listens on and accepts, as QEMU's chardev
(`server=on`) does: the hub sees no difference. What the guest writes reaches every
client; one interactive writer at a time (force takes over); a client that stops reading
is dropped, not the VM; the end of QEMU's output ends every client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from vmspawnd.errors import ConsoleBusy, NotConnected
from vmspawnd.qemu.console import CLIENT_BUFFER, SLOW_MESSAGE, TAKEN_OVER_MESSAGE, AttachMode, ConsoleHub, History

TIMEOUT = 10.0


class Qemu:
    """The chardev's end: the hub connects, we accept and write as the guest."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "console"
        self.log = directory / "console.log"
        History.create(self.log)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None

    async def accept(self) -> None:
        self.conn, _ = await asyncio.get_running_loop().sock_accept(self.listener)

    async def guest_writes(self, data: bytes) -> None:
        assert self.conn is not None
        with open(self.log, "ab") as log:
            log.write(data)  # QEMU's logfile=: what history is made of
        await asyncio.get_running_loop().sock_sendall(self.conn, data)

    async def received(self, size: int) -> bytes:
        assert self.conn is not None
        data = b""
        async with asyncio.timeout(TIMEOUT):
            while len(data) < size:
                data += await asyncio.get_running_loop().sock_recv(self.conn, size - len(data))
        return data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest_asyncio.fixture
async def console(short_tmp: Path) -> AsyncIterator[tuple[ConsoleHub, Qemu]]:
    qemu = Qemu(short_tmp)
    hub = ConsoleHub("vm", qemu.path, qemu.log)
    try:
        await asyncio.gather(hub.connect(), qemu.accept())
        yield hub, qemu
    finally:
        await hub.close(drain=False)
        qemu.close()


async def read(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from a client's end (or what came before EOF)."""
    sock.setblocking(False)
    data = b""
    async with asyncio.timeout(TIMEOUT):
        while len(data) < size:
            chunk = await asyncio.get_running_loop().sock_recv(sock, size - len(data))
            if not chunk:
                break
            data += chunk
    return data


async def read_to_eof(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = b""
    async with asyncio.timeout(TIMEOUT):
        while chunk := await asyncio.get_running_loop().sock_recv(sock, 65536):
            data += chunk
    return data


@pytest.mark.asyncio
async def test_output_reaches_every_client_and_history_comes_first(console: tuple[ConsoleHub, Qemu]) -> None:
    hub, qemu = console
    first = hub.open(AttachMode.READ_ONLY)
    with first:
        await qemu.guest_writes(b"early boot\n")
        assert await read(first, 11) == b"early boot\n"  # the hub has passed it on: it is history now
    late = hub.open(AttachMode.READ_ONLY, history=4096)
    other = hub.open(AttachMode.READ_ONLY)  # no history asked: only what comes from now on
    with late, other:
        assert await read(late, 11) == b"early boot\n"
        await qemu.guest_writes(b"login: ")
        assert await read(late, 7) == b"login: "
        assert await read(other, 7) == b"login: "


@pytest.mark.asyncio
async def test_only_the_writer_types_and_force_takes_over(console: tuple[ConsoleHub, Qemu]) -> None:
    hub, qemu = console
    watcher = hub.open(AttachMode.READ_ONLY)
    writer = hub.open(AttachMode.INTERACTIVE)
    with watcher, writer:
        with pytest.raises(ConsoleBusy):
            hub.open(AttachMode.INTERACTIVE)
        watcher.sendall(b"ignored")  # read and dropped: a watcher cannot type
        writer.sendall(b"root\n")
        assert await qemu.received(5) == b"root\n"
        usurper = hub.open(AttachMode.INTERACTIVE, force=True)
        with usurper:
            assert await read_to_eof(writer) == TAKEN_OVER_MESSAGE  # told, then detached
            assert hub.writer is not None and len(hub.clients) == 2
            usurper.sendall(b"ls\n")
            assert await qemu.received(3) == b"ls\n"  # nothing of "ignored" came before it


@pytest.mark.asyncio
async def test_a_client_that_stops_reading_is_dropped_not_the_others(console: tuple[ConsoleHub, Qemu]) -> None:
    hub, qemu = console
    stalled = hub.open(AttachMode.READ_ONLY)
    reader = hub.open(AttachMode.READ_ONLY)
    with stalled, reader:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its kernel buffer fills soon
        flood = b"x" * (2 * CLIENT_BUFFER)
        chunk = 64 * 1024
        for offset in range(0, len(flood), chunk):
            await qemu.guest_writes(flood[offset : offset + chunk])
            assert await read(reader, chunk) == flood[offset : offset + chunk]  # keeps up, keeps everything
        assert len(hub.clients) == 1
        received = (await read_to_eof(stalled)).removesuffix(SLOW_MESSAGE)  # the notice, when it fits
        assert len(received) < len(flood) and flood.startswith(received)  # cut off, and nothing garbled


@pytest.mark.asyncio
async def test_the_end_of_qemu_ends_every_client_after_its_last_words(console: tuple[ConsoleHub, Qemu]) -> None:
    hub, qemu = console
    client = hub.open(AttachMode.READ_ONLY)
    with client:
        await qemu.guest_writes(b"reboot: Power down\n")
        assert qemu.conn is not None
        qemu.conn.close()  # QEMU exited
        qemu.conn = None
        await hub.close(drain=True)
        assert await read_to_eof(client) == b"reboot: Power down\n"
        with pytest.raises(NotConnected):
            hub.open(AttachMode.READ_ONLY)
