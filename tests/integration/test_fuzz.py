# SPDX-License-Identifier: LGPL-2.1-or-later
"""Hypothesis throws bytes at one real daemon's manager socket.

What a client sends is never trusted: invalid UTF-8, text that is not JSON, JSON that is
not a call, calls with made-up or real method names and garbage parameters, `more` and
`oneway` flags, deep nesting, huge numbers, wrong types; and connections that are half
closed, reset, cut before the NUL, or that never end their frame. Whatever comes, the
daemon stays up, answers each NUL-terminated frame exactly once (none for a well-formed
`oneway` call) with a reply or a typed error under an interface the client can look up,
and afterwards has the fds it had before. A frame that is not a well-formed call (not
JSON, not an object, or a call object of the wrong shape: a flag that is not a boolean,
two flags, no qualified method name, parameters that are not an object) gets a typed
ProtocolViolation and the daemon hangs up; so does `upgrade`, which no method supports
(InvalidParameter). No VM is needed, so this runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import struct

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from vmspawnctl.varlink import JsonObject

from tests.support import MANAGER, Daemon, children_of, daemon_fds

# 1000 examples against a real daemon take about 20 s: the slow tier, not the fast one.
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]

TYPED_ERROR = re.compile(r"^(org\.varlink\.service|io\.vmspawnd\.Manager)\.[A-Z][A-Za-z]*$")
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
METHODS = [
    *(
        f"{MANAGER}.{m}"
        for m in (
            "Spawn",
            "List",
            "Describe",
            "PowerOff",
            "Terminate",
            "Kill",
            "WaitReady",
            "Pause",
            "Resume",
            "Reboot",
            "Remove",
            "SubscribeEvents",
            "OpenConsole",
            "ReadConsoleLog",
            "HoldMachine",
        )
    ),
    "org.varlink.service.GetInfo",
    "org.varlink.service.GetInterfaceDescription",
]


@dataclasses.dataclass
class Tally:
    """What was sent, for the report and for the ≥ 30 % malformed requirement."""

    frames: int = 0
    malformed: int = 0
    oneway: int = 0
    replies: int = 0
    connections: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)


TALLY = Tally()


# --- what to send -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """A frame that parses as a JSON object, and what the daemon must do with it: `reply`
    (a result or a typed error), `oneway` (nothing), `violation` (ProtocolViolation, then
    EOF) or `upgrade` (InvalidParameter(upgrade), then EOF)."""

    frame: bytes
    expect: str


# Varlink's names, checked as asyncvarlink checks them (re.match with `$`, which also
# matches before a final newline: such a name is well-formed and simply not found).
INTERFACE_NAME = re.compile(r"^[A-Za-z](?:-*[A-Za-z0-9])*(?:\.[A-Za-z0-9](?:-*[A-Za-z0-9])*)+$")
MEMBER_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def expected_outcome(obj: dict[str, object]) -> str:
    """What a call object must get, from the Varlink call shape alone."""
    method = obj.get("method")
    if not isinstance(method, str):
        return "violation"
    interface, dot, member = method.rpartition(".")
    if not dot or not INTERFACE_NAME.match(interface) or not MEMBER_NAME.match(member):
        return "violation"
    if not isinstance(obj.get("parameters", {}), dict):
        return "violation"
    flags = [obj.get(key, False) for key in ("oneway", "more", "upgrade")]
    if not all(isinstance(flag, bool) for flag in flags) or sum(bool(flag) for flag in flags) > 1:
        return "violation"
    if obj.get("upgrade"):
        return "upgrade"
    return "oneway" if obj.get("oneway") else "reply"


@dataclasses.dataclass(frozen=True)
class Bad:
    """A frame that is not UTF-8, not JSON, or JSON no parser should be made to build (too
    deep, too long a number): a ProtocolViolation, then the daemon hangs up."""

    frame: bytes


@dataclasses.dataclass(frozen=True)
class Ending:
    """How the client ends its connection: close, half-close (replies still due), reset,
    or a last frame without its NUL followed by a close."""

    how: str
    tail: bytes = b""


def _no_nul(data: bytes) -> bytes:
    return data.replace(b"\0", b"")


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**4000), max_value=10**4000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
method_name = st.one_of(
    st.sampled_from(METHODS),
    st.sampled_from(METHODS).map(lambda m: m + "x"),
    st.sampled_from(METHODS).map(lambda m: m.lower()),
    st.text(max_size=60),
    st.from_regex(r"\A[a-z]+(\.[a-zA-Z]+){1,3}\Z"),
)
# Mostly absent or boolean, so that most calls reach a method; sometimes a wrong type.
flag = st.one_of(st.none(), st.none(), st.none(), st.booleans(), st.booleans(), json_leaf)


@st.composite
def calls(draw: st.DrawFn) -> Call:
    obj: dict[str, object] = {}
    method = draw(st.one_of(method_name, method_name, method_name, json_value))
    # (Hypothesis favours small integers: the common case is the small one.)
    if draw(st.integers(0, 9)) < 9:
        obj["method"] = method
    params = draw(
        st.one_of(
            st.dictionaries(st.text(max_size=12), json_value, max_size=5),
            st.fixed_dictionaries({"name": json_value}),
            st.fixed_dictionaries({"spec": json_value}),
            st.fixed_dictionaries({"name": st.text(max_size=20), "signal": json_value}),
            json_value,
        )
    )
    if draw(st.integers(0, 7)) < 7:
        obj["parameters"] = params
    if draw(st.integers(0, 3)) == 3:  # any combination, wrong types included
        for key in ("more", "oneway", "upgrade"):
            value = draw(flag)
            if value is not None:
                obj[key] = value
    else:  # one valid flag at most, so that most calls reach a method
        obj.update(draw(st.sampled_from([{}, {}, {"more": True}, {"oneway": True}, {"more": False, "oneway": False}])))
    if draw(st.integers(0, 7)) == 7:  # unknown keys in the call object itself
        obj.update(draw(st.dictionaries(st.text(max_size=8), json_value, max_size=2)))
    frame = json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if b"\\ud8" in frame.lower() or _has_surrogate(frame):
        frame = json.dumps(obj, ensure_ascii=True).encode()
    return Call(_no_nul(frame), expected_outcome(obj))  # (json.dumps escapes NUL: _no_nul changes nothing)


def _has_surrogate(frame: bytes) -> bool:
    try:
        frame.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    return False


@st.composite
def bad_frames(draw: st.DrawFn) -> Bad:
    kind = draw(st.sampled_from(["binary", "latin1", "text", "truncated", "non-object", "deep", "digits"]))
    if kind == "binary":  # invalid UTF-8 for sure: a lone continuation or 0xff somewhere
        data = draw(st.binary(max_size=200)) + draw(st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80"]))
        data += draw(st.binary(max_size=50))
    elif kind == "latin1":  # a call, but encoded in Latin-1 with a non-ASCII name
        data = json.dumps({"method": f"{MANAGER}.Describe", "parameters": {"name": "caf\xe9"}}, ensure_ascii=False).encode(
            "latin-1"
        )
    elif kind == "text":
        data = draw(st.text(min_size=1, max_size=100).filter(_not_json)).encode("utf-8", "surrogatepass")
    elif kind == "truncated":
        call = draw(calls()).frame
        data = call[: draw(st.integers(0, max(0, len(call) - 1)))]
    elif kind == "non-object":
        data = json.dumps(draw(json_value.filter(lambda v: not isinstance(v, dict)))).encode()
    elif kind == "deep":  # valid JSON, but deeper than any parser should recurse
        depth = draw(st.integers(10_000, 200_000))
        inner = "[" * depth + "]" * depth
        data = f'{{"method": "{MANAGER}.List", "parameters": {{"x": {inner}}}}}'.encode()
    else:  # valid JSON, but a number longer than Python's int conversion allows
        digits = draw(st.integers(5_000, 100_000))
        data = f'{{"method": "{MANAGER}.Kill", "parameters": {{"name": "x", "signal": 1{"0" * digits}}}}}'.encode()
    return Bad(_no_nul(data))


endings = st.one_of(
    st.just(Ending("close")),
    st.just(Ending("half-close")),
    st.just(Ending("reset", b'{"method":"org.varlink.service.GetInfo"}')),
    # Reset while a stream is in flight: the daemon must drop the subscriber (fd count).
    st.just(Ending("reset", f'{{"method":"{MANAGER}.SubscribeEvents","parameters":{{}},"more":true}}'.encode())),
    calls().map(lambda c: Ending("no-nul", c.frame)),
    bad_frames().map(lambda b: Ending("no-nul", b.frame)),
)


# --- the client side ------------------------------------------------------------------------


class Client:
    """One raw connection: frames out, NUL-terminated replies in."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(20)
        self.sock.connect(address)
        self.buffer = b""
        TALLY.connections += 1

    def send(self, frame: bytes, nul: bool = True) -> None:
        self.sock.sendall(frame + (b"\0" if nul else b""))

    def receive(self) -> JsonObject | None:
        """The next reply, or None at EOF."""
        while b"\0" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                assert self.buffer == b"", f"reply cut short: {self.buffer[:200]!r}"
                return None
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        reply = json.loads(raw.decode("utf-8"))
        assert isinstance(reply, dict), raw
        TALLY.replies += 1
        return reply

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def check_reply(reply: JsonObject | None, frame: bytes) -> bool:
    """A reply is a typed error or a well-formed reply; returns whether more replies follow."""
    assert reply is not None, f"no reply to {frame[:300]!r}"
    if "error" in reply:
        name = str(reply["error"])
        assert TYPED_ERROR.match(name), f"untyped error {name!r} for {frame[:300]!r}"
        assert isinstance(reply.get("parameters", {}), dict), reply
        TALLY.errors[name] = TALLY.errors.get(name, 0) + 1
        return False
    assert isinstance(reply.get("parameters", {}), dict), reply
    return bool(reply.get("continues", False))


def sentinel(client: Client) -> None:
    """A GetInfo after the rest: its reply must be the next one, so no oneway call was answered."""
    client.send(b'{"method":"org.varlink.service.GetInfo"}')
    reply = client.receive()
    assert reply is not None and "error" not in reply, reply
    assert reply["parameters"]["product"] == "vmspawnd", reply


def run_session(address: str, items: list[Call | Bad], ending: Ending) -> None:
    """Send `items` over as few connections as the daemon allows, checking every reply."""
    client = Client(address)
    try:
        for item in items:
            TALLY.frames += 1
            client.send(item.frame)
            if isinstance(item, Bad):
                TALLY.malformed += 1
                reply = client.receive()
                assert reply is not None and reply.get("error") == f"{MANAGER}.ProtocolViolation", (reply, item.frame[:300])
                assert client.receive() is None, "the daemon must hang up after a protocol violation"
                client.close()
                client = Client(address)
                continue
            if item.expect in ("violation", "upgrade"):
                TALLY.malformed += 1
                reply = client.receive()
                wanted = f"{MANAGER}.ProtocolViolation" if item.expect == "violation" else "org.varlink.service.InvalidParameter"
                assert reply is not None and reply.get("error") == wanted, (reply, item.frame[:300])
                TALLY.errors[wanted] = TALLY.errors.get(wanted, 0) + 1
                assert client.receive() is None, "the daemon must hang up after a call it refused"
                client.close()
                client = Client(address)
                continue
            if item.expect == "oneway":
                TALLY.oneway += 1
                continue
            if check_reply(client.receive(), item.frame):
                # A stream (SubscribeEvents, HoldMachine with `more`): leave it by hanging up.
                client.close()
                client = Client(address)
        sentinel(client)
        if ending.how == "close":
            client.close()
        elif ending.how == "reset":
            client.send(ending.tail)
            client.reset()
        elif ending.how == "no-nul":
            TALLY.frames += 1
            TALLY.malformed += 1
            client.send(ending.tail, nul=False)
            client.close()
        else:  # half-close: what was sent before the EOF is still answered, then EOF
            client.send(b'{"method":"org.varlink.service.GetInfo"}')
            client.sock.shutdown(socket.SHUT_WR)
            reply = client.receive()
            assert reply is not None and reply["parameters"]["product"] == "vmspawnd", reply
            assert client.receive() is None
            client.close()
    finally:
        client.close()


# --- the tests ------------------------------------------------------------------------------


def wait_for_fds(daemon: Daemon, baseline: list[str]) -> list[str]:
    """The daemon closes a hung-up connection when its loop gets to it: every round trip
    gives it that chance, so compare after each (bounded), never after a sleep."""
    current = daemon_fds(daemon)
    for _ in range(200):
        if current == baseline:
            break
        daemon.call("List")
        current = daemon_fds(daemon)
    return current


@pytest.fixture(scope="module")
def baseline(daemon: Daemon) -> list[str]:
    daemon.call("List")
    return daemon_fds(daemon)


# No shrinking: a hang shrinks for minutes; the failing example is printed as generated.
@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    phases=[Phase.explicit, Phase.generate],
)
@given(
    items=st.lists(st.one_of(calls(), bad_frames()), min_size=1, max_size=4),
    ending=endings,
)
def test_fuzzed_requests_get_typed_answers(daemon: Daemon, baseline: list[str], items: list[Call | Bad], ending: Ending) -> None:
    run_session(daemon.address, items, ending)
    assert daemon.alive(), daemon.log()[-3000:]


def test_oversized_and_cut_frames(daemon: Daemon, baseline: list[str]) -> None:
    """Frames over MAX_MESSAGE_SIZE without a NUL are cut off; one byte under is served."""
    for _ in range(3):
        client = Client(daemon.address)
        try:
            client.sock.sendall(b"[" * (MAX_MESSAGE_SIZE + 4096))
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            try:
                assert client.receive() is None
            except ConnectionResetError:
                pass
        client.close()
        TALLY.frames += 1
        TALLY.malformed += 1
    # Just under the cap and NUL-terminated: an answer (a typed error: the padding is not a parameter).
    client = Client(daemon.address)
    pad = "x" * (MAX_MESSAGE_SIZE - 200)
    client.send(json.dumps({"method": f"{MANAGER}.Describe", "parameters": {"name": pad}}).encode())
    reply = client.receive()
    assert reply is not None and reply["error"] == f"{MANAGER}.NoSuchMachine", str(reply)[:200]
    sentinel(client)
    client.close()
    TALLY.frames += 1


def test_daemon_survived_with_its_fds(daemon: Daemon, baseline: list[str]) -> None:
    """Runs after the fuzzing: the daemon serves, created nothing, holds what it held before."""
    assert daemon.alive(), daemon.log()[-3000:]
    assert daemon.call("List")["machines"] == []
    log = daemon.log()
    # (asyncvarlink logs a failed send to a reset peer at debug level, traceback included.)
    lines = log.splitlines()
    problems = [i for i, line in enumerate(lines) if " ERROR " in line or " CRITICAL " in line or "unhandled exception" in line]
    assert not problems, "\n".join(lines[problems[0] : problems[0] + 40] if problems else [])
    assert children_of(daemon.process.pid) == []
    assert wait_for_fds(daemon, baseline) == baseline
    print(
        f"\nfuzz: {TALLY.frames} requests, {TALLY.malformed} malformed "
        f"({100 * TALLY.malformed / max(1, TALLY.frames):.0f} %), {TALLY.oneway} oneway, "
        f"{TALLY.replies} replies over {TALLY.connections} connections; fds {len(baseline)} before and after; "
        f"errors: {dict(sorted(TALLY.errors.items()))}"
    )
    assert TALLY.frames >= 1000
    assert TALLY.malformed >= 0.3 * TALLY.frames
