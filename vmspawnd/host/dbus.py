# SPDX-License-Identifier: LGPL-2.1-or-later
"""Method calls on the bus of our service manager, bounded, with error replies as exceptions.

The plumbing that the VM's scope unit (`scope`) and machined's D-Bus fallback (`machined`)
share: dbus-fast answers an error reply with a Message, not an exception, and has no
timeout of its own. DBUS_SYSTEM_BUS_ADDRESS / DBUS_SESSION_BUS_ADDRESS are honoured by
dbus-fast.
"""

from __future__ import annotations

import asyncio

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from vmspawnd.errors import DBusCallError

CALL_TIMEOUT = 10.0


async def connect_bus(is_root: bool) -> MessageBus:
    """The bus of our service manager: the system bus for root, else the session bus."""
    bus_type = BusType.SYSTEM if is_root else BusType.SESSION
    async with asyncio.timeout(CALL_TIMEOUT):
        return await MessageBus(bus_type=bus_type, negotiate_unix_fd=True).connect()


async def dbus_call(bus: MessageBus, message: Message, timeout: float = CALL_TIMEOUT) -> Message:
    """Send `message` and return the reply; an error reply raises DBusCallError."""
    async with asyncio.timeout(timeout):
        reply = await bus.call(message)
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise DBusCallError(reply.error_name or "unknown", text)
    return reply


def add_match_message(rule: str) -> Message:
    """org.freedesktop.DBus.AddMatch: the bus delivers signals matching `rule` to us."""
    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="AddMatch",
        signature="s",
        body=[rule],
    )


def bus_label_escape(text: str) -> str:
    """systemd's bus_label_escape(): object path elements allow only [A-Za-z0-9_];
    everything else becomes _XX. dbus-fast does not validate outgoing paths, and an
    invalid one makes dbus-daemon drop the whole connection (docs/reference/libraries.md §3)."""
    if not text:
        return "_"
    out = []
    for i, b in enumerate(text.encode()):
        ch = chr(b)
        if (ch.isascii() and ch.isalpha()) or (i > 0 and ch.isascii() and ch.isdigit()):
            out.append(ch)
        else:
            out.append(f"_{b:02x}")
    return "".join(out)
