# SPDX-License-Identifier: LGPL-2.1-or-later
"""The client side of a VM console: the terminal, the relay loop, the escape key.

The daemon hands out the console as a stream socket (OpenConsole, by fd passing);
this module relays it to the caller's terminal. The terminal goes raw for the time
of the relay and is restored on every way out (return, exception, SIGTERM, SIGHUP),
because a terminal left raw is the one thing a user cannot easily repair.
Ctrl-] three times within one second ends the relay, as in systemd-vmspawn.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator

from .output import paged
from .varlink import INTERFACE, Connection, VarlinkError

ESCAPE = 0x1D  # Ctrl-]
ESCAPE_COUNT = 3
ESCAPE_WINDOW = 1.0


def open_console(conn: Connection, name: str, mode: str, force: bool = False, history: int = 0) -> socket.socket:
    """OpenConsole: the stream arrives as the reply's only fd."""
    params: dict[str, object] = {"name": name, "mode": mode}
    if force:
        params["force"] = True
    if history:
        params["history"] = history
    return socket.socket(fileno=conn.call_for_fd(f"{INTERFACE}.OpenConsole", params))


class EscapeDetector:
    """Counts Ctrl-] presses; three within ESCAPE_WINDOW seconds of the first one trigger.

    Any other byte resets the count, like systemd's pty forwarder.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._count = 0
        self._first = 0.0

    def feed(self, data: bytes) -> bool:
        for byte in data:
            if byte != ESCAPE:
                self._count = 0
                continue
            now = self._clock()
            if self._count == 0 or now - self._first > ESCAPE_WINDOW:
                self._count, self._first = 1, now
            else:
                self._count += 1
            if self._count >= ESCAPE_COUNT:
                self._count = 0
                return True
        return False


class Terminated(Exception):
    """A terminating signal arrived; raised so that every `finally` runs."""

    def __init__(self, signo: int) -> None:
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Make `fd` raw if it is a terminal; yields whether it did. Always restores it."""
    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield False
        return
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def signals_raise(*signals: int) -> Iterator[None]:
    """Turn terminating signals into the Terminated exception for the duration."""

    def handler(signo: int, _frame: object) -> None:
        raise Terminated(signo)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


class Relay:
    """Copies console ↔ terminal until the console ends, Ctrl-]×3, or `extra` says stop.

    `extra` maps further fds to callbacks returning True to end the relay; `run`
    uses it for the HoldMachine stream and a signal wake-up pipe.
    """

    def __init__(self, sock: socket.socket | None, interactive: bool, stdin: int | None = 0, stdout: int = 1) -> None:
        self.sock = sock
        self.interactive = interactive
        self.stdin = stdin if stdin is not None else -1
        self.stdout = stdout
        self.escape = EscapeDetector()
        self.extra: dict[int, Callable[[], bool]] = {}
        self.console_open = sock is not None

    def run(self) -> str:
        """Returns why it ended: "escape", "ended" (the console closed) or "extra"."""
        stdin_open = self.stdin >= 0
        while True:
            watched = list(self.extra)
            if self.sock is not None and self.console_open:
                watched.append(self.sock.fileno())
            if stdin_open:
                watched.append(self.stdin)
            if not watched:
                return "ended"
            try:
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            for fd in ready:
                if fd in self.extra and self.extra[fd]():
                    return "extra"
            if self.sock is not None and self.console_open and self.sock.fileno() in ready:
                data = self.sock.recv(65536)
                if not data:
                    self.console_open = False
                    if not self.extra:
                        return "ended"
                else:
                    write_all(self.stdout, data)
            if stdin_open and self.stdin in ready:
                data = os.read(self.stdin, 4096)
                if not data:
                    stdin_open = False
                    continue
                if self.escape.feed(data):
                    return "escape"
                if self.sock is not None and self.interactive and self.console_open:
                    with contextlib.suppress(OSError):
                        self.sock.sendall(data)

    def drain(self, timeout: float = 2.0) -> None:
        """Copy what is still queued on the console (the guest's last words), bounded."""
        deadline = time.monotonic() + timeout
        while self.sock is not None and self.console_open:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                return
            data = self.sock.recv(65536)
            if not data:
                self.console_open = False
                return
            write_all(self.stdout, data)


def attach(conn: Connection, name: str, read_only: bool, force: bool) -> int:
    """`vmspawnctl console NAME`: relay until Ctrl-]×3 (the VM runs on) or the console ends."""
    sock = open_console(conn, name, "read-only" if read_only else "interactive", force=force, history=16384)
    stdin = sys.stdin.fileno()
    is_tty = os.isatty(stdin)
    if is_tty:
        how = "Ctrl-] three times within 1s to detach"
        print(f"Connected to {name}'s console{' (read-only)' if read_only else ''}. Press {how}.", file=sys.stderr, flush=True)
    try:
        with signals_raise(signal.SIGTERM, signal.SIGHUP), raw_terminal(stdin):
            reason = Relay(sock, interactive=not read_only, stdin=stdin).run()
    except Terminated:
        reason = "signal"
    finally:
        sock.close()
    if is_tty:
        text = {"escape": "Detached", "ended": "Console closed", "signal": "Detached"}.get(reason, "Detached")
        print(f"\r\n{text}; {name} keeps running." if reason != "ended" else f"\r\n{text}.", file=sys.stderr, flush=True)
    return 0


def no_console_reason(machine: dict[str, object]) -> str | None:
    """Why a VM has no console history to show, if it has none: gui and headless VMs have
    no console at all (their history would print nothing, and say nothing about why)."""
    spec = machine.get("spec")
    mode = spec.get("console") if isinstance(spec, dict) else None
    name = machine.get("name")
    if mode == "gui":
        return (
            f"{name} has no console, so no console history: a --console=gui VM shows its output on its display "
            f"(vmspawnctl screenshot {name} FILE)"
        )
    if mode == "headless":
        return f"{name} has no console, so no console history: it runs with --console=headless"
    return None


def follow_log(conn: Connection, name: str, lines: int | None, follow: bool, pager: bool = True) -> int:
    """`vmspawnctl log NAME [-f]`: the history, then (with -f) the live console, read-only.

    Without -f the history goes through a pager on a terminal (unless `pager` is false), as
    journalctl's does; -f never pages, the stream has no end for a pager to wait for."""
    if reason := no_console_reason(conn.call(f"{INTERFACE}.Describe", {"name": name})["machine"]):
        print(f"vmspawnctl: {reason}", file=sys.stderr)
        return 1
    sock = None
    if follow:
        # Attach before reading the history: a line may show twice, but none is lost.
        try:
            sock = open_console(conn, name, "read-only")
        except VarlinkError as exc:
            if exc.short_name not in ("InvalidState", "NotConnected", "NotSupported"):
                raise
    params: dict[str, object] = {"name": name}
    if lines is not None:
        params["lines"] = lines
    text = str(conn.call(f"{INTERFACE}.ReadConsoleLog", params)["text"])
    if not follow:
        with paged(pager) as page:
            page.write(text.encode("utf-8", errors="replace"))
        return 0
    out = sys.stdout.buffer
    out.write(text.encode("utf-8", errors="replace"))
    out.flush()
    if sock is None:
        return 0
    try:
        with signals_raise(signal.SIGTERM, signal.SIGHUP):
            while data := sock.recv(65536):
                out.write(data)
                out.flush()
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        sock.close()
    return 0
