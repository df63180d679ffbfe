# SPDX-License-Identifier: LGPL-2.1-or-later
"""A small blocking Varlink client, stdlib only.

vmspawnctl's one-shot calls must not pay for importing asyncio (docs/reference/libraries.md §1.4:
~40 ms for a stdlib client against ~118 ms with asyncvarlink), so the CLI speaks the
wire protocol directly: NUL-terminated JSON objects over AF_UNIX, fds via SCM_RIGHTS.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

# Varlink messages are JSON objects whose shape the IDL, not Python, describes.
JsonObject = dict[str, Any]

MAX_FDS = 16


# vmspawnd's interface (vmspawnd.errors.INTERFACE, which the client does not import for speed).
INTERFACE = "io.vmspawnd.Manager"


class VarlinkError(Exception):
    """The service answered with a Varlink error."""

    def __init__(self, name: str, parameters: JsonObject) -> None:
        super().__init__(f"{name} {json.dumps(parameters)}" if parameters else name)
        self.name = name
        self.parameters = parameters

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


class ConnectionFailed(Exception):
    """No service answered at the address."""


def parse_address(address: str) -> str:
    """Accept `unix:PATH` (varlinkctl/python-varlink style) or a bare path."""
    path = address.removeprefix("unix:")
    return "\0" + path[1:] if path.startswith("@") else path


class Connection:
    def __init__(self, address: str, timeout: float | None = None) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(parse_address(address))
        except OSError as exc:
            self._sock.close()
            raise ConnectionFailed(f"cannot connect to {address}: {exc.strerror or exc}") from None
        self._buffer = b""
        self._fds: list[int] = []

    def close(self) -> None:
        self._sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, method: str, parameters: Mapping[str, object] | None = None, *, more: bool = False) -> None:
        message: JsonObject = {"method": method, "parameters": dict(parameters or {})}
        if more:
            message["more"] = True
        self._sock.sendall(json.dumps(message).encode() + b"\0")

    def receive(self) -> JsonObject:
        """One reply; raises VarlinkError for an error reply. Received fds accumulate in take_fds()."""
        while b"\0" not in self._buffer:
            fds = array.array("i")
            data, ancdata, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            self._fds.extend(fds)
            if not data:
                raise ConnectionFailed("the service closed the connection")
            self._buffer += data
        frame, self._buffer = self._buffer.split(b"\0", 1)
        reply: JsonObject = json.loads(frame)
        if "error" in reply:
            raise VarlinkError(reply["error"], reply.get("parameters") or {})
        return reply

    def fileno(self) -> int:
        """For select(): a reply (or the end of a `more` stream) is readable here."""
        return self._sock.fileno()

    def take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def call(self, method: str, parameters: Mapping[str, object] | None = None) -> JsonObject:
        self.send(method, parameters)
        return dict(self.receive().get("parameters") or {})

    def call_for_fd(self, method: str, parameters: Mapping[str, object] | None = None) -> int:
        """A call whose reply carries exactly one fd (OpenConsole, Screenshot); returns it."""
        self.call(method, parameters)
        fds = self.take_fds()
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"{method} returned {len(fds)} file descriptors instead of 1")
        return fds[0]

    def call_more(self, method: str, parameters: Mapping[str, object] | None = None) -> Iterator[JsonObject]:
        self.send(method, parameters, more=True)
        while True:
            reply = self.receive()
            yield dict(reply.get("parameters") or {})
            if not reply.get("continues"):
                return
