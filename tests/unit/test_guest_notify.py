# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest's notify channel: the pure parser of `KEY=VALUE` messages and EXIT_STATUS=,
and the listener on its AF_UNIX stand-in (the vsock listener differs only in its socket)."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmspawnd.qemu.guest_notify import (
    NOTIFY_BUFFER_MAX,
    MalformedMessage,
    NotifyListener,
    open_unix_listener,
    parse_exit_status,
    parse_notify_message,
)


@pytest.mark.parametrize(
    ("data", "fields"),
    [
        (b"READY=1", {"READY": "1"}),
        (b"READY=1\nSTATUS=Started\n", {"READY": "1", "STATUS": "Started"}),
        (b"STATUS=a=b", {"STATUS": "a=b"}),  # only the first = separates
        (b"STATUS=", {"STATUS": ""}),
        (b"\n\nREADY=1\n\n", {"READY": "1"}),  # empty lines are skipped
        (b"READY=1\rSTATUS=x\r\n", {"READY": "1", "STATUS": "x"}),  # CR separates too (vmspawn)
        (b"STATUS=first\nSTATUS=second", {"STATUS": "second"}),  # the last one counts
        ("STATUS=Grüße".encode(), {"STATUS": "Grüße"}),
    ],
)
def test_parse_notify_message(data: bytes, fields: dict[str, str]) -> None:
    assert parse_notify_message(data) == fields


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty message"),
        (b"\n\r\n", "empty message"),
        (b"READY=1\nno separator", "line without KEY=VALUE"),
        (b"=value", "line without KEY=VALUE"),
        (b"STATUS=\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_messages_are_refused_whole(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        parse_notify_message(data)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("0", 0),
        ("3", 3),
        ("255", 255),
        ("007", 7),
        ("256", None),
        ("-1", None),
        ("", None),
        (" 1", None),
        ("1.0", None),
        ("x", None),
    ],
)
def test_exit_status_is_a_uint8(value: str, status: int | None) -> None:
    assert parse_exit_status(value) == status


# --- the listener ------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmspawnd-n-", dir="/tmp") as path:
        yield Path(path)


def send_as_guest(path: Path, payload: bytes) -> None:
    """Connect, write, half-close, and wait for the listener to hang up: it is done with
    this connection then (reported or dropped); it never answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
        except BrokenPipeError:
            pass  # an oversized message: the listener stopped reading and hung up first
        sock.shutdown(socket.SHUT_WR)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


@pytest.mark.asyncio
async def test_listener_reports_good_messages_and_drops_bad_ones(short_dir: Path) -> None:
    sock, address = open_unix_listener(short_dir / "notify")
    assert address == f"unix:{short_dir / 'notify'}"
    received: list[dict[str, str]] = []
    listener = NotifyListener(sock, address, received.append, "vm")
    await listener.start()
    try:
        send = asyncio.get_running_loop().run_in_executor
        path = short_dir / "notify"
        await send(None, send_as_guest, path, b"READY=1\nSTATUS=up\n")
        await send(None, send_as_guest, path, b"not a field")
        await send(None, send_as_guest, path, b"STATUS=" + b"x" * NOTIFY_BUFFER_MAX)
        await send(None, send_as_guest, path, b"STATUS=" + b"x" * (NOTIFY_BUFFER_MAX - 7))  # at the cap
        assert received == [{"READY": "1", "STATUS": "up"}, {"STATUS": "x" * (NOTIFY_BUFFER_MAX - 7)}]
    finally:
        await listener.close()
    assert sock.fileno() == -1  # closed with the listener
