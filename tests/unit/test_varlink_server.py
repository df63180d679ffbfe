# SPDX-License-Identifier: LGPL-2.1-or-later
"""The hardened Varlink server at its seams: connections that end badly, servers that close
while a call runs, and call objects that are not calls.

Real asyncvarlink servers (`serve_unix`) with a small test interface, in the test's event
loop, driven by blocking AF_UNIX clients in threads (so a client never touches the loop's
selector). No VM and no daemon: each test takes well under a second when nothing hangs;
every wait is bounded by BOUND, so a regression fails instead of hanging.
"""

import asyncio
import collections.abc
import json
import os
import re
import socket
import struct
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from asyncvarlink import TypedVarlinkErrorReply, VarlinkInterface, VarlinkInterfaceRegistry, varlinkmethod
from asyncvarlink.util import VarlinkUnixServer

from vmspawnd.varlink.server import close_gracefully, serve_unix

BOUND = 5.0  # seconds: any answer, EOF or drain the tests wait for (generous for a loaded host)
TYPED_ERROR = re.compile(r"^(org\.varlink\.service|io\.vmspawnd\.Manager|com\.example\.Probe)\.[A-Z][A-Za-z]*$")
PROBE = "com.example.Probe"


class StreamEnded(TypedVarlinkErrorReply, interface=PROBE):
    """Ends a Stream, as NotConnected ends a VM's SubscribeEvents when the VM is gone."""

    class Parameters:
        pass


class Tick(typing.TypedDict):
    n: int


class Probe(VarlinkInterface, name=PROBE):
    """A slow call the test releases, a stream, and a quick call; events say what ran."""

    errors = (StreamEnded,)

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.ended = asyncio.Event()
        self.cancelled = asyncio.Event()

    @varlinkmethod
    def Ping(self) -> None:
        """Answers at once."""

    @varlinkmethod
    async def Slow(self) -> None:
        """Answers once released."""
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.ended.set()

    @varlinkmethod(delay_generator=False)
    async def Stream(self) -> collections.abc.AsyncIterator[Tick]:
        """One tick at once; once released, ends with StreamEnded."""
        self.entered.set()
        try:
            yield {"n": 0}
            await self.release.wait()
            raise StreamEnded()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.ended.set()


class Client:
    """A blocking AF_UNIX client; each operation runs in a thread, bounded by BOUND.

    The socket is made in the constructor, so a test can take an fd number before the
    server frees one (the kernel hands out the lowest free number).
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(BOUND)
        self.buffer = b""

    @classmethod
    async def to(cls, path: Path) -> "Client":
        client = cls()
        await client.connect(path)
        return client

    async def connect(self, path: Path) -> None:
        await asyncio.to_thread(self.sock.connect, str(path))

    async def send(self, call: dict[str, object] | bytes) -> None:
        frame = call if isinstance(call, bytes) else json.dumps(call).encode()
        await asyncio.to_thread(self.sock.sendall, frame + b"\0")

    async def receive(self) -> dict[str, typing.Any] | None:
        """The next reply, None at EOF; TimeoutError if neither comes within BOUND."""
        return await asyncio.to_thread(self._receive)

    def _receive(self) -> dict[str, typing.Any] | None:
        while b"\0" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert self.buffer == b"", f"reply cut short: {self.buffer!r}"
                return None
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        reply = json.loads(raw)
        assert isinstance(reply, dict), raw
        return reply

    async def call(self, method: str, **flags: bool) -> dict[str, typing.Any] | None:
        await self.send({"method": f"{PROBE}.{method}", "parameters": {}, **flags})
        return await self.receive()

    def reset(self) -> None:
        """Close with SO_LINGER 0: the server's next read gets ECONNRESET, not EOF."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


Serve = Callable[[str], Awaitable[tuple[VarlinkUnixServer, Probe, Path]]]


def stale_selector_keys(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Selector registrations whose fd is closed: epoll dropped them, the selector's map did
    not, and a socket that gets the number next is silently never read."""
    selector = loop._selector  # type: ignore[attr-defined]  # asyncio private: the only view of the map
    stale = []
    for fd in selector.get_map():
        try:
            os.fstat(fd)
        except OSError:
            stale.append(fd)
    return stale


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start servers on tmp_path/NAME; afterwards no selector key may be left for a closed fd."""
    started: list[tuple[VarlinkUnixServer, Probe]] = []

    async def start(name: str) -> tuple[VarlinkUnixServer, Probe, Path]:
        probe = Probe()
        registry = VarlinkInterfaceRegistry()
        registry.register_interface(probe)
        path = tmp_path / name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        server = await serve_unix(sock, registry, lambda _peer: True)
        started.append((server, probe))
        return server, probe, path

    yield start
    loop = asyncio.get_running_loop()
    for server, probe in started:
        probe.release.set()
        await asyncio.wait_for(close_gracefully(server, BOUND), 2 * BOUND)
    assert stale_selector_keys(loop) == []


# --- a server whose connections are cut must not break the loop's other servers -------------


@pytest.mark.asyncio
@pytest.mark.parametrize("call_ends", ["after the close", "never"])
async def test_clients_closed_mid_call_leave_the_other_server_serving(serve: Serve, call_ends: str) -> None:
    """The regression of bug 1: a VM's control server cut its connections (close_clients)
    while a call ran, and the next connection to the manager socket was never read."""
    control, control_probe, control_path = await serve("control")
    _manager, _, manager_path = await serve("manager")
    caller = await Client.to(control_path)
    later = Client()  # made now: its server side gets the fd number the cut connection frees
    await caller.send({"method": f"{PROBE}.Slow"})
    await asyncio.wait_for(control_probe.entered.wait(), BOUND)

    control.close_clients()
    assert await caller.receive() is None  # cut off without an answer: what close_clients does
    if call_ends == "after the close":
        control_probe.release.set()
        await asyncio.wait_for(control_probe.ended.wait(), BOUND)

    await later.connect(manager_path)
    assert await later.call("Ping") == {}  # before the fix: TimeoutError, never read
    for _ in range(20):  # and every connection after it
        client = await Client.to(manager_path)
        assert await client.call("Ping") == {}
        client.close()
    assert stale_selector_keys(asyncio.get_running_loop()) == []
    for client in (caller, later):
        client.close()


# --- close_gracefully ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_graceful_close_answers_the_call_in_flight(serve: Serve) -> None:
    server, probe, path = await serve("control")
    _other, _, other_path = await serve("manager")
    idle = await Client.to(path)
    assert await idle.call("Ping") == {}
    busy = await Client.to(path)
    await busy.send({"method": f"{PROBE}.Slow"})
    await asyncio.wait_for(probe.entered.wait(), BOUND)

    drain = close_gracefully(server, timeout=10 * BOUND)
    assert await idle.receive() is None  # idle: closed at once, while the call still runs
    with pytest.raises(ConnectionRefusedError):
        await Client.to(path)  # no longer accepting
    other = await Client.to(other_path)  # the loop's other servers serve meanwhile
    assert await other.call("Ping") == {}
    assert not drain.done()

    probe.release.set()
    assert await busy.receive() == {}  # the answer, then the close
    assert await busy.receive() is None
    await asyncio.wait_for(drain, BOUND)
    assert not probe.cancelled.is_set()
    after = await Client.to(other_path)
    assert await after.call("Ping") == {}
    for client in (idle, busy, other, after):
        client.close()


@pytest.mark.asyncio
async def test_graceful_close_ends_a_stream_with_its_error(serve: Serve) -> None:
    """A `more` stream that its method ends when the server's owner goes away (as a VM's
    SubscribeEvents ends with NotConnected) gets that error, then the close."""
    server, probe, path = await serve("control")
    stream = await Client.to(path)
    first = await stream.call("Stream", more=True)
    assert first == {"parameters": {"n": 0}, "continues": True}

    drain = close_gracefully(server, timeout=10 * BOUND)
    probe.release.set()
    assert await stream.receive() == {"error": f"{PROBE}.StreamEnded"}
    assert await stream.receive() is None
    await asyncio.wait_for(drain, BOUND)
    stream.close()


@pytest.mark.asyncio
async def test_graceful_close_starts_no_new_call(serve: Serve) -> None:
    """A call queued behind the one in flight is not started: answer, then EOF."""
    server, probe, path = await serve("control")
    client = await Client.to(path)
    await client.send({"method": f"{PROBE}.Slow"})
    await asyncio.wait_for(probe.entered.wait(), BOUND)
    await client.send({"method": f"{PROBE}.Stream", "more": True})  # would set `entered` again

    drain = close_gracefully(server, timeout=10 * BOUND)
    probe.entered.clear()
    probe.release.set()
    assert await client.receive() == {}
    assert await client.receive() is None
    await asyncio.wait_for(drain, BOUND)
    assert not probe.entered.is_set()
    client.close()


@pytest.mark.asyncio
async def test_graceful_close_is_bounded(serve: Serve) -> None:
    """A call that never ends cannot keep its connection: cut off and cancelled after the bound."""
    server, probe, path = await serve("control")
    _other, _, other_path = await serve("manager")
    stuck = await Client.to(path)
    await stuck.send({"method": f"{PROBE}.Slow"})
    await asyncio.wait_for(probe.entered.wait(), BOUND)

    await asyncio.wait_for(close_gracefully(server, timeout=0.2), BOUND)
    assert await stuck.receive() is None
    await asyncio.wait_for(probe.cancelled.wait(), BOUND)
    client = await Client.to(other_path)
    assert await client.call("Ping") == {}
    for c in (stuck, client):
        c.close()


# --- peers that go away mid-call ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_peer_reset_mid_call_cancels_it_and_the_server_serves_on(serve: Serve) -> None:
    _server, probe, path = await serve("manager")
    for _ in range(3):
        probe.entered.clear()
        probe.cancelled.clear()
        client = await Client.to(path)
        await client.send({"method": f"{PROBE}.Slow"})
        await asyncio.wait_for(probe.entered.wait(), BOUND)
        client.reset()
        await asyncio.wait_for(probe.cancelled.wait(), BOUND)
        fresh = await Client.to(path)
        assert await fresh.call("Ping") == {}
        fresh.close()


@pytest.mark.asyncio
async def test_hang_up_mid_stream_cancels_it_and_the_server_serves_on(serve: Serve) -> None:
    _server, probe, path = await serve("manager")
    for _ in range(3):
        probe.cancelled.clear()
        client = await Client.to(path)
        assert await client.call("Stream", more=True) == {"parameters": {"n": 0}, "continues": True}
        client.close()
        await asyncio.wait_for(probe.cancelled.wait(), BOUND)
        fresh = await Client.to(path)
        assert await fresh.call("Ping") == {}
        fresh.close()


# --- call objects that are not calls --------------------------------------------------------------

PING = f"{PROBE}.Ping"
MALFORMED = {
    "oneway not a boolean": {"method": PING, "parameters": {}, "oneway": 1.5},
    "oneway a string": {"method": PING, "oneway": "yes"},
    "oneway zero": {"method": PING, "oneway": 0},
    "more not a boolean": {"method": PING, "more": 1},
    "upgrade not a boolean": {"method": PING, "upgrade": "x"},
    "oneway and more": {"method": PING, "oneway": True, "more": True},
    "more and upgrade": {"method": PING, "more": True, "upgrade": True},
    "upgrade on a method without it": {"method": PING, "upgrade": True},
    "method not a string": {"method": 5, "parameters": {}},
    "method missing": {"parameters": {}},
    "method unqualified": {"method": "Ping"},
    "parameters a list": {"method": PING, "parameters": []},
    "parameters null": {"method": PING, "parameters": None},
}


@pytest.mark.asyncio
@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_calls_get_a_typed_error_then_eof(serve: Serve, frame: dict[str, object]) -> None:
    _server, _, path = await serve("manager")
    client = await Client.to(path)
    await client.send(frame)
    reply = await client.receive()  # never silence: TimeoutError fails the test
    assert reply is not None, "closed without an answer"
    assert TYPED_ERROR.match(reply.get("error", "")), reply
    if frame.get("upgrade") is True and "more" not in frame:
        assert reply == {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "upgrade"}}
    else:
        assert reply["error"] == "io.vmspawnd.Manager.ProtocolViolation", reply
    assert await client.receive() is None  # then a clean close
    fresh = await Client.to(path)
    assert await fresh.call("Ping") == {}
    for c in (client, fresh):
        c.close()


@pytest.mark.asyncio
async def test_well_formed_oneway_call_still_gets_no_reply(serve: Serve) -> None:
    _server, _, path = await serve("manager")
    client = await Client.to(path)
    await client.send({"method": PING, "oneway": True})
    await client.send({"method": f"{PROBE}.Stream", "oneway": True})  # a `more` method: an error, unsent
    assert await client.call("Ping") == {}  # the next reply is this call's: nothing came before it
    client.close()
