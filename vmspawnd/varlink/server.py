# SPDX-License-Identifier: LGPL-2.1-or-later
"""asyncvarlink's server, hardened for a daemon: the workarounds of docs/reference/libraries.md §1.6.

Kept in one module so they can be dropped one by one as upstream fixes land. They use
asyncvarlink's public hooks, except in two places where 0.3.3 has none (the connection's
socket, `_on_message_sent`; docs/dependencies.md says why), hence the exact pin of
asyncvarlink==0.3.3. The numbers are those of the list in docs/dependencies.md:

1. a client that hangs up while its call is in flight is noticed (MSG_PEEK watch, or
   a reply that cannot be sent because the peer is gone) and the handler is cancelled —
   otherwise a `more` stream or a slow call leaks. The watch reads a dup of the
   connection's socket, so its selector registration is its own fd, which only the
   watch closes (right after removing it): armed on the connection's own fd, it was
   left behind as a stale selector key when asyncvarlink closed that fd during the
   call (close_clients), and the next connection given the same fd number was never
   read. It is also removed in connection_lost, before asyncvarlink closes the fd,
   so the dup never holds a closed connection open;
3. listening sockets get a real backlog instead of listen(1);
4. every call knows its peer (SO_PEERCRED) through a ContextVar, and calls from a
   peer the policy refuses get a typed PermissionDenied before any method runs;
5. LISTEN_* are removed from the environment after adoption (see sdnotify);
7. our exceptions are mapped to their Varlink names in exactly one place;
8. a call object that is not a well-formed call (method not a qualified name, parameters
   not an object, oneway/more/upgrade not booleans or combined) gets a typed
   ProtocolViolation and a close: asyncvarlink answered it only if `obj.get("oneway")`
   was falsy, so `"oneway": 1.5` got silence. `upgrade`, which asyncvarlink ignores and
   no method here supports, gets InvalidParameter(upgrade) and a close;
9. `close_gracefully`: asyncvarlink's server can only cut its connections
   (close_clients/abort_clients), so a call in flight — Terminate, which ends the VM and
   with it the VM's server — lost its reply. A gracefully closed server stops accepting,
   closes idle connections at once and busy ones once their calls in flight have been
   answered, and cuts off what is still busy after a bound.
Also: frames without a NUL terminator are capped at MAX_MESSAGE_SIZE, and a frame
that is not a JSON object gets a typed ProtocolViolation and a close; frames the JSON
parser would choke on (not UTF-8, nested too deep, numbers too long) get the same, and
asyncvarlink's made-up `invalid.asyncvarlink.*` errors are replaced by typed ones; a call
cancelled by item 1 completes quietly (asyncvarlink would raise in its done callbacks).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import socket
import typing

from asyncvarlink import (
    FileDescriptorArray,
    GenericVarlinkErrorReply,
    VarlinkErrorReply,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodCall,
    VarlinkTransport,
)
from asyncvarlink.serviceerrors import InvalidParameter
from asyncvarlink.types import JSONObject
from asyncvarlink.util import VarlinkUnixServer

from vmspawnd import override
from vmspawnd.errors import PermissionDenied, ProtocolViolation, VmspawnError
from vmspawnd.host.peer import Peer, PeerPolicy, peer_credentials

_log = logging.getLogger(__name__)

MAX_MESSAGE_SIZE = 4 * 1024 * 1024
# How long close_gracefully waits for calls in flight before it cuts their connections.
DRAIN_TIMEOUT = 10.0
PUBLIC_INTERFACES = frozenset({"org.varlink.service"})


# The peer of the call being handled (item 4): set around every call, read by the methods.
current_peer: contextvars.ContextVar[Peer] = contextvars.ContextVar("current_peer")


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
    # The parameters are the error's dataclass fields: strings (vmspawnd/errors.py).
    return GenericVarlinkErrorReply(exc.varlink_name(), typing.cast(JSONObject, exc.parameters()))


def _quiet_when_cancelled(call_fut: asyncio.Future[None]) -> asyncio.Future[None]:
    """What asyncvarlink is given for a call in flight: `call_fut`'s outcome, except that a
    call cancelled because its client is gone (item 1) ends quietly — it has no one to
    answer. asyncvarlink 0.3.3 would ask the cancelled future for its exception(), which
    raises CancelledError inside its done callback (an ERROR in the log per hung-up
    stream) and never releases the connection's back-pressure; returning a future of our
    own from call_received (its public contract) keeps it from seeing the cancellation.
    """
    outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(done: asyncio.Future[None]) -> None:
        if outcome.done():
            return
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            outcome.set_result(None)
        else:
            outcome.set_exception(exc)

    call_fut.add_done_callback(settle)
    return outcome


def _clip(text: str, limit: int = 200) -> str:
    """A client's text echoed in an error, kept short (a method name may be 4 MiB long)."""
    return text if len(text) <= limit else text[:limit] + "…"


class HardenedServerProtocol(VarlinkInterfaceServerProtocol):
    """One connection: peer check per call, hang-up detection, size cap, error mapping."""

    def __init__(self, registry: VarlinkInterfaceRegistry, policy: PeerPolicy, server: HardenedUnixServer | None = None) -> None:
        super().__init__(registry)
        self._policy = policy
        self._server = server
        self._peer: Peer | None = None
        self._watch: socket.socket | None = None  # the hang-up watch's own dup of the socket, while armed
        self._calls: set[asyncio.Future[None]] = set()  # in flight, for _peer_gone
        self._ending = False  # no new calls: close once those in flight are answered
        self._partial = b""  # the start of a frame whose NUL has not arrived yet
        # Ours, from connection_made: VarlinkProtocol.close() forgets its own, abort() still needs it.
        self._connection: VarlinkTransport | None = None

    @override
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, VarlinkTransport)
        self._connection = transport
        sock = self._socket()
        if sock is not None:
            try:
                self._peer = peer_credentials(sock)
            except OSError:
                self._peer = None
        if self._server is not None:
            self._server._connection_made(self)

    @override
    def connection_lost(self, exc: Exception | None) -> None:
        # asyncvarlink calls this before it closes the connection's fd: the watch's dup goes
        # now, or it would keep the connection open for the peer until the call ended.
        self._unwatch()
        if self._server is not None:
            self._server._connection_lost(self)
        super().connection_lost(exc)

    def _socket(self) -> socket.socket | None:
        """The connection's socket, for SO_PEERCRED and the hang-up watch.

        Private in asyncvarlink 0.3.3 (`VarlinkTransport._recvfd`, read only): the server
        builds each transport with only `peername` as extra info (empty for AF_UNIX
        clients), and its protocol factory is called without the accepted socket.
        """
        sock = getattr(self._connection, "_recvfd", None)
        return sock if isinstance(sock, socket.socket) else None

    # --- ending a connection (item 9) ------------------------------------------------------
    def end(self) -> None:
        """Take no new calls; close once the calls in flight have been answered (now if idle)."""
        self._ending = True
        # What asyncvarlink does at the client's EOF is what ending means: no more calls are
        # read from this connection, and VarlinkServerProtocol closes it once the calls in
        # flight and the sends of their replies are done (now, if there are none).
        self.eof_received()

    def abort(self) -> None:
        """Cut the connection now and cancel its calls: nobody is left to answer them."""
        self._ending = True
        for fut in list(self._calls):
            fut.cancel()
        if self._connection is not None:
            self._connection.abort()

    def _refuse(self, error: VarlinkErrorReply) -> None:
        """Answer with `error`, then hang up: after a frame that is not a plain call, the
        client's idea of the conversation (a reply due? the connection upgraded?) is unknown,
        so nothing later on this connection could be matched to what it expects."""
        self.send_error(error)
        self.end()

    # --- framing -------------------------------------------------------------------
    @override
    def message_received(self, data: bytes, fds: FileDescriptorArray | None) -> None:
        # The frames are cut here, and asyncvarlink is handed whole frames only (its own
        # buffer stays empty): so a frame's size is capped, and a frame its parser would
        # choke on is screened first (asyncvarlink only catches JSONDecodeError; a frame
        # that is not UTF-8 raised UnicodeDecodeError out of the transport and wedged the
        # connection). Such frames become one that fails JSON parsing, answered by
        # error_received.
        frames = (self._partial + data).split(b"\0")
        self._partial = frames.pop()
        if frames:
            super().message_received(b"\0".join(_screen_frame(frame) for frame in frames) + b"\0", fds)
        if len(self._partial) > MAX_MESSAGE_SIZE:
            _log.warning("closing connection from %s: frame larger than %d bytes", self._peer, MAX_MESSAGE_SIZE)
            self._partial = b""
            if self._connection is not None:
                self._connection.abort()

    @override
    def error_received(self, err: Exception, data: bytes, fds: FileDescriptorArray | None) -> None:
        reason = _SCREENED.get(data, "frame is not a JSON object")
        _log.info("protocol violation from %s: %s", self._peer, err)
        self._refuse(to_varlink_error(ProtocolViolation(reason)))

    @override
    def send_error(self, error: VarlinkErrorReply) -> asyncio.Future[None]:
        # asyncvarlink answers a JSON object that is not a call with the made-up interface
        # `invalid.asyncvarlink`, which no client can look up: use our typed error instead.
        # (request_received catches malformed calls first; this stays as the safety net.)
        if error.name == "invalid.asyncvarlink.ProtocolViolation":
            error = to_varlink_error(
                ProtocolViolation("not a Varlink call (method, parameters, oneway, more or upgrade missing or mistyped)")
            )
        elif error.name.startswith("invalid.asyncvarlink."):
            error = GenericVarlinkErrorReply("io.vmspawnd.Manager.InternalError", {"message": error.name})
        return super().send_error(error)

    # --- calls -----------------------------------------------------------------------
    @override
    def request_received(self, obj: JSONObject, fds: FileDescriptorArray | None) -> asyncio.Future[None] | None:
        # Item 8. asyncvarlink answers a call object that fails parsing only when
        # obj.get("oneway") is falsy: {"oneway": 1.5} or {"oneway": "yes"} got no answer at
        # all, and neither did {"oneway": true, "more": true}. Parsed here first (cheap, and
        # the same parser) so that every malformed call gets the same typed answer.
        try:
            call = VarlinkMethodCall.fromjson(obj)
        except (TypeError, ValueError) as exc:
            _log.info("protocol violation from %s: %s", self._peer, exc)
            self._refuse(to_varlink_error(ProtocolViolation(_clip(f"not a Varlink call: {exc}"))))
            return None
        if call.upgrade:
            # asyncvarlink ignores `upgrade` and would answer as if the connection stayed
            # Varlink, while the client then speaks its upgraded protocol. No method here
            # supports upgrading (nor does systemd's MachineInstance).
            self._refuse(InvalidParameter(parameter="upgrade"))
            return None
        if self._ending:
            # The server is going away (or the client broke the protocol): no new calls.
            # The connection closes as soon as what is in flight has been answered.
            self.end()
            return None
        # (asyncvarlink's own override decorator leaves its methods untyped for mypy.)
        handled: asyncio.Future[None] | None = super().request_received(obj, fds)
        return handled

    @override
    def call_received(self, call: VarlinkMethodCall, fds: FileDescriptorArray | None) -> asyncio.Future[None] | None:
        if call.method_interface not in PUBLIC_INTERFACES:
            if self._peer is None or not self._policy(self._peer):
                raise to_varlink_error(PermissionDenied())
        if self._peer is not None:
            current_peer.set(self._peer)
        call_fut: asyncio.Future[None] | None = super().call_received(call, fds)
        if call_fut is None or call_fut.done():
            return call_fut
        self._calls.add(call_fut)
        call_fut.add_done_callback(self._calls.discard)
        asyncio.get_running_loop().call_soon(self._watch_hangup, call_fut)
        return _quiet_when_cancelled(call_fut)

    @override
    def send_message(self, obj: JSONObject, fds: list[int] | None = None, autoclose: bool = True) -> asyncio.Future[None]:
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

    @override
    def _on_message_sent(self, fut: asyncio.Future[None]) -> None:
        # Private in asyncvarlink 0.3.3, and overridden for want of a public way: a reply
        # whose sending was cancelled with its call is no error, but asyncvarlink asks the
        # cancelled future for its exception(), which raises inside the callback. (The
        # future is the relay above: the call awaiting it cancels it, and nothing public
        # stands between the call and the future send_reply watches.)
        if not fut.cancelled():
            super()._on_message_sent(fut)

    @override
    def handle_call_exception(self, exc: BaseException, oneway: bool) -> None:
        if isinstance(exc, VmspawnError):
            raise to_varlink_error(exc)
        if isinstance(exc, asyncio.CancelledError):
            return  # the client hung up; nobody to answer
        _log.error("internal error in a method call", exc_info=exc)
        raise GenericVarlinkErrorReply("io.vmspawnd.Manager.InternalError", {"message": str(exc)})

    # --- hang-up detection (docs/reference/libraries.md §1.6 item 1) ------------------------------------
    def _peer_gone(self) -> None:
        """A reply could not be sent: the peer closed its end for good (a half-closed peer
        still reads). That also catches a hang-up the transport itself read as EOF in the
        same read as the call, before the MSG_PEEK reader could be armed."""
        for fut in list(self._calls):
            if not fut.done():
                _log.debug("peer %s is gone; cancelling its call", self._peer)
                fut.cancel()

    def _watch_hangup(self, fut: asyncio.Future[None]) -> None:
        """While a call runs, asyncvarlink does not read its connection: watch it for EOF.

        The watch reads a dup of the socket, never the connection's own fd. A selector key
        for the connection's fd would be left stale when asyncvarlink closes that fd while
        the watch is armed (it removes only its own reader, and only when not paused):
        epoll drops a closed fd by itself, the selector's map does not, and the next socket
        given the same number then gets add_reader turned into a no-op modify — that
        connection is never read. The dup is ours: it is closed only by _unwatch, right
        after its key is removed, and a second key never replaces or removes the
        transport's own reader either.
        """
        sock = self._socket()
        if fut.done() or sock is None or self._watch is not None:
            return
        # The call is in flight, so asyncvarlink has paused reading this connection
        # (back-pressure until the call is done): nothing else would see an EOF now.
        try:
            watch = sock.dup()
        except OSError:
            return  # out of fds: a reply that cannot be sent still catches the hang-up
        self._watch = watch
        asyncio.get_running_loop().add_reader(watch, self._check_hangup, watch, fut)
        fut.add_done_callback(lambda _: self._unwatch(watch))

    def _unwatch(self, watch: socket.socket | None = None) -> None:
        """Remove the watch (only `watch`, if given: a later call may have its own)."""
        current = self._watch
        if current is None or (watch is not None and watch is not current):
            return
        self._watch = None
        asyncio.get_running_loop().remove_reader(current)
        current.close()

    def _check_hangup(self, watch: socket.socket, fut: asyncio.Future[None]) -> None:
        try:
            data = watch.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._unwatch(watch)
        if data == b"" and not fut.done():
            _log.debug("peer %s hung up during a call; cancelling it", self._peer)
            fut.cancel()


_DRAINS: set[asyncio.Task[None]] = set()  # drains nobody awaits must not be garbage-collected


class HardenedUnixServer(VarlinkUnixServer):
    """asyncvarlink's AF_UNIX server, knowing its live connections so that it can close
    gracefully (item 9) instead of cutting calls in flight."""

    def __init__(self, sock: socket.socket, registry: VarlinkInterfaceRegistry, policy: PeerPolicy) -> None:
        super().__init__(sock, lambda: HardenedServerProtocol(registry, policy, self))
        self._connections: set[HardenedServerProtocol] = set()
        self._changed = asyncio.Event()
        self._ending = False
        self._drain: asyncio.Task[None] | None = None

    def _connection_made(self, conn: HardenedServerProtocol) -> None:
        self._connections.add(conn)
        if self._ending:  # accepted just before the close, connected just after it
            conn.end()

    def _connection_lost(self, conn: HardenedServerProtocol) -> None:
        self._connections.discard(conn)
        self._changed.set()

    def close_gracefully(self, timeout: float = DRAIN_TIMEOUT) -> asyncio.Task[None]:
        """Stop accepting now; close idle connections now and busy ones once their calls in
        flight have been answered; after `timeout` seconds cut off (and cancel) what is
        left. Returns the drain, done when every connection is closed; it runs whether or
        not anyone awaits it (a call in flight may itself be waiting for the caller of
        this to finish, as Terminate waits for its VM's teardown)."""
        self.close()
        if self._drain is None:
            self._ending = True
            for conn in list(self._connections):
                conn.end()
            self._drain = asyncio.get_running_loop().create_task(self._drained(timeout), name="varlink-drain")
            _DRAINS.add(self._drain)
            self._drain.add_done_callback(_DRAINS.discard)
        return self._drain

    async def _drained(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while self._connections:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            _log.warning(
                "%d Varlink connection(s) still busy %gs after their server closed; cutting them off",
                len(self._connections),
                timeout,
            )
        finally:  # also when cancelled (the daemon exits): nothing may stay open
            for conn in list(self._connections):
                conn.abort()


def close_gracefully(server: VarlinkUnixServer, timeout: float = DRAIN_TIMEOUT) -> asyncio.Future[None]:
    """Close `server` without cutting off calls in flight (see HardenedUnixServer)."""
    if isinstance(server, HardenedUnixServer):
        return server.close_gracefully(timeout)
    server.close()
    server.close_clients()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


async def serve_unix(sock: socket.socket, registry: VarlinkInterfaceRegistry, policy: PeerPolicy) -> HardenedUnixServer:
    """Serve `registry` on a bound (or socket-activated) AF_UNIX stream socket."""
    # What asyncvarlink's create_unix_server(sock=...) does, with our server class.
    sock.setblocking(False)
    server = HardenedUnixServer(sock, registry, policy)
    await server.start_serving()
    sock.listen(socket.SOMAXCONN)  # asyncvarlink sets backlog 1 (docs/reference/libraries.md §1.6 item 3)
    return server
