# SPDX-License-Identifier: LGPL-2.1-or-later
"""asyncvarlink's server, hardened for a daemon: the workarounds of libraries.md §1.6.

Kept in one module so they can be dropped one by one as upstream fixes land (they
touch private attributes, hence the exact pin of asyncvarlink==0.3.3):

1. a client that hangs up while its call is in flight is noticed (MSG_PEEK reader, or
   a reply that cannot be sent because the peer is gone) and the handler is cancelled —
   otherwise a `more` stream or a slow call leaks;
3. listening sockets get a real backlog instead of listen(1);
4. every call knows its peer (SO_PEERCRED) through a ContextVar, and calls from a
   peer the policy refuses get a typed PermissionDenied before any method runs;
5. LISTEN_* are removed from the environment after adoption (see sdnotify);
7. our exceptions are mapped to their Varlink names in exactly one place.
Also: frames without a NUL terminator are capped at MAX_MESSAGE_SIZE, and a frame
that is not a JSON object gets a typed ProtocolViolation and a close; frames the JSON
parser would choke on (not UTF-8, nested too deep, numbers too long) get the same, and
asyncvarlink's made-up `invalid.asyncvarlink.*` errors are replaced by typed ones; a call
cancelled by item 1 completes quietly (asyncvarlink would raise in its done callbacks).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import socket
import struct
from collections.abc import Callable

from asyncvarlink import (
    FileDescriptorArray,
    GenericVarlinkErrorReply,
    VarlinkErrorReply,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodCall,
    create_unix_server,
)
from asyncvarlink.types import JSONObject
from asyncvarlink.util import VarlinkUnixServer

from .errors import PermissionDenied, ProtocolViolation, VmspawnError

_log = logging.getLogger(__name__)

MAX_MESSAGE_SIZE = 4 * 1024 * 1024
PUBLIC_INTERFACES = frozenset({"org.varlink.service"})


@dataclasses.dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


current_peer: contextvars.ContextVar[Peer] = contextvars.ContextVar("current_peer")

PeerPolicy = Callable[[Peer], bool]


def peer_credentials(sock: socket.socket) -> Peer:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid, uid, gid)


_NOT_UTF8 = b"\x01not-utf-8"
_UNPARSABLE = b"\x01unparsable"
_SCREENED = {_NOT_UTF8: "frame is not UTF-8", _UNPARSABLE: "frame nests too deep or has a number too long to parse"}


def _screen_frame(frame: bytes) -> bytes:
    """Replace a frame asyncvarlink's parser would choke on by a marker that fails parsing.

    asyncvarlink only catches JSONDecodeError around json.loads: a frame that is not UTF-8
    (UnicodeDecodeError), nests deeper than the recursion limit (RecursionError) or holds an
    integer beyond Python's 4300-digit conversion limit (ValueError) escapes into the event
    loop, and the client waits forever for an answer. The markers get a typed
    ProtocolViolation from error_received instead. Parsing twice costs little: frames are
    capped at MAX_MESSAGE_SIZE and calls are small.
    """
    try:
        text = frame.decode("utf-8")  # strict: json.loads(bytes) would let surrogates pass
    except UnicodeDecodeError:
        return _NOT_UTF8
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return frame  # asyncvarlink answers these itself
    except (ValueError, RecursionError):
        return _UNPARSABLE
    return frame


def to_varlink_error(exc: VmspawnError) -> VarlinkErrorReply:
    return GenericVarlinkErrorReply(exc.varlink_name(), exc.parameters())  # type: ignore[arg-type]


class HardenedServerProtocol(VarlinkInterfaceServerProtocol):
    """One connection: peer check per call, hang-up detection, size cap, error mapping."""

    def __init__(self, registry: VarlinkInterfaceRegistry, policy: PeerPolicy) -> None:
        super().__init__(registry)
        self._policy = policy
        self._peer: Peer | None = None
        self._watching = False
        self._calls: set[asyncio.Future[None]] = set()  # in flight, for _peer_gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = self._socket()
        if sock is not None:
            try:
                self._peer = peer_credentials(sock)
            except OSError:
                self._peer = None

    def _socket(self) -> socket.socket | None:
        sock = getattr(self._transport, "_recvfd", None)  # private: libraries.md §1.6 item 4
        return sock if isinstance(sock, socket.socket) else None

    # --- framing -------------------------------------------------------------------
    def message_received(self, data: bytes, fds: FileDescriptorArray | None) -> None:
        # asyncvarlink only catches JSONDecodeError; a frame that is not UTF-8 raises
        # UnicodeDecodeError out of the transport and wedges the connection. Replace such
        # frames by one that fails JSON parsing, so error_received answers it.
        frames = data.split(b"\0")
        if len(frames) > 1:
            head = self._recv_buffer + frames[0]
            complete = [head, *frames[1:-1]]
            for index, frame in enumerate(complete):
                complete[index] = _screen_frame(frame)
            self._recv_buffer = b""
            data = b"\0".join([*complete, frames[-1]])
        super().message_received(data, fds)
        if len(self._recv_buffer) > MAX_MESSAGE_SIZE:
            _log.warning("closing connection from %s: frame larger than %d bytes", self._peer, MAX_MESSAGE_SIZE)
            self._recv_buffer = b""
            if self._transport is not None:
                self._transport.abort()

    def error_received(self, err: Exception, data: bytes, fds: FileDescriptorArray | None) -> None:
        reason = _SCREENED.get(data, "frame is not a JSON object")
        _log.info("protocol violation from %s: %s", self._peer, err)
        self.send_error(to_varlink_error(ProtocolViolation(reason)))
        self._closing = True
        self._maybe_close_if_idle()

    def send_error(self, error: VarlinkErrorReply) -> asyncio.Future[None]:
        # asyncvarlink answers a JSON object that is not a call with the made-up interface
        # `invalid.asyncvarlink`, which no client can look up: use our typed error instead.
        if error.name == "invalid.asyncvarlink.ProtocolViolation":
            error = to_varlink_error(ProtocolViolation("not a Varlink call (method, parameters, oneway, more or upgrade missing or mistyped)"))
        elif error.name.startswith("invalid.asyncvarlink."):
            error = GenericVarlinkErrorReply("io.vmspawnd.Manager.InternalError", {"message": error.name})
        return super().send_error(error)

    # --- calls -----------------------------------------------------------------------
    def call_received(
        self, call: VarlinkMethodCall, fds: FileDescriptorArray | None
    ) -> asyncio.Future[None] | None:
        if call.method_interface not in PUBLIC_INTERFACES:
            if self._peer is None or not self._policy(self._peer):
                raise to_varlink_error(PermissionDenied())
        if self._peer is not None:
            current_peer.set(self._peer)
        fut = super().call_received(call, fds)
        if fut is not None and not fut.done():
            self._calls.add(fut)
            fut.add_done_callback(self._calls.discard)
            asyncio.get_running_loop().call_soon(self._watch_hangup, fut)
        return fut

    def _on_receiver_completes(
        self, backpressure_fut: asyncio.Future[None], oneway: bool, call_fut: asyncio.Future[None]
    ) -> None:
        # Private in asyncvarlink 0.3.3: it asks a cancelled future for its exception(), which
        # raises CancelledError inside the callback (an ERROR in the log per hung-up stream)
        # and never releases the connection's back-pressure future.
        if call_fut.cancelled():
            if not backpressure_fut.done():
                backpressure_fut.set_result(None)
            return
        super()._on_receiver_completes(backpressure_fut, oneway, call_fut)  # type: ignore[misc]

    def send_message(
        self, obj: JSONObject, fds: list[int] | None = None, autoclose: bool = True
    ) -> asyncio.Future[None]:
        # A call cancelled by item 1 cancels the send it awaits, and that is the transport's
        # own future: its writer then fails with InvalidStateError on set_exception() and
        # leaves its queue unresolved. Hand out a relay, so cancellation stops at the caller.
        inner = super().send_message(obj, fds, autoclose)
        outer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def relay(done: asyncio.Future[None]) -> None:
            exc = None if done.cancelled() else done.exception()
            if outer.done():
                return
            if done.cancelled():
                outer.cancel()
            elif exc is not None:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    self._peer_gone()  # which may cancel `outer` with the call awaiting it
                if not outer.done():
                    outer.set_exception(exc)
            else:
                outer.set_result(None)

        inner.add_done_callback(relay)
        return outer

    def _on_message_sent(self, fut: asyncio.Future[None]) -> None:
        # Likewise: a reply whose sending was cancelled with its call is no error.
        if not fut.cancelled():
            super()._on_message_sent(fut)  # type: ignore[misc]

    def handle_call_exception(self, exc: BaseException, oneway: bool) -> None:
        if isinstance(exc, VmspawnError):
            raise to_varlink_error(exc)
        if isinstance(exc, asyncio.CancelledError):
            return  # the client hung up; nobody to answer
        _log.error("internal error in a method call", exc_info=exc)
        raise GenericVarlinkErrorReply("io.vmspawnd.Manager.InternalError", {"message": str(exc)})

    # --- hang-up detection (libraries.md §1.6 item 1) ------------------------------------
    def _peer_gone(self) -> None:
        """A reply could not be sent: the peer closed its end for good (a half-closed peer
        still reads). That also catches a hang-up the transport itself read as EOF in the
        same read as the call, before the MSG_PEEK reader could be armed."""
        for fut in list(self._calls):
            if not fut.done():
                _log.debug("peer %s is gone; cancelling its call", self._peer)
                fut.cancel()

    def _watch_hangup(self, fut: asyncio.Future[None]) -> None:
        sock = self._socket()
        if fut.done() or sock is None or self._watching:
            return
        if not getattr(self._transport, "_paused", False):
            return  # the transport reads by itself and will see EOF
        loop = asyncio.get_running_loop()
        self._watching = True
        loop.add_reader(sock, self._check_hangup, sock, fut)
        fut.add_done_callback(lambda _: self._unwatch(sock))

    def _unwatch(self, sock: socket.socket) -> None:
        if self._watching:
            self._watching = False
            if sock.fileno() >= 0:
                asyncio.get_running_loop().remove_reader(sock)

    def _check_hangup(self, sock: socket.socket, fut: asyncio.Future[None]) -> None:
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._unwatch(sock)
        if data == b"" and not fut.done():
            _log.debug("peer %s hung up during a call; cancelling it", self._peer)
            fut.cancel()


async def serve_unix(
    sock: socket.socket, registry: VarlinkInterfaceRegistry, policy: PeerPolicy
) -> VarlinkUnixServer:
    """Serve `registry` on a bound (or socket-activated) AF_UNIX stream socket."""
    server = await create_unix_server(lambda: HardenedServerProtocol(registry, policy), sock=sock)
    sock.listen(socket.SOMAXCONN)  # asyncvarlink sets backlog 1 (libraries.md §1.6 item 3)
    return server
