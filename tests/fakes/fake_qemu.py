#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A stand-in for QEMU, only for fast seam tests of the daemon's lifecycle code.

It stands in for QEMU in component tests (tests/component) that run beside the real
boots (tests/integration, marked `vm`), never instead of them: it lets the start, stop
and failure paths of machine.py, manager.py, process.py and qmp.py run in milliseconds,
and it can fail in ways a real QEMU only fails by accident (hang, crash, drop QMP).
tests/component/test_fake_qemu.py runs the same QMP conversation against it and against
the real QEMU (marked `qemu`) so that the two do not drift apart.

It is started exactly as vmspawnd starts QEMU: found as `qemu` in $PATH (the first name
vmspawnd's find_qemu_binary tries; tests/fakes/__init__.py installs it there), exec'd by
the per-VM reaper with vmspawnd's argv, and given the listening sockets the daemon bound:

  -chardev socket,id=vmspawn-qmp,fd=N,server=on,wait=off   the QMP monitor (one client at
                                                           a time, greeted on accept)
  -chardev socket,id=console,fd=M,server=on,wait=off,logfile=PATH,logappend=on[,mux=on]
                                                           the console: the "guest" output
                                                           goes to PATH and to the client
  -S                                                       start in `prelaunch`
  -append "WORDS"                                          the kernel command line: it
                                                           carries the fault markers below

What it does on QMP, as QEMU does: the greeting (capabilities ["oob"]), qmp_capabilities
(every other command is refused before it), `query-status`, `cont` (RESUME), `stop`
(STOP), `system_reset` (RESET host-qmp-system-reset), `system_powerdown` (POWERDOWN; a
running guest then shuts down: SHUTDOWN guest-shutdown, exit 0), `quit` (SHUTDOWN
host-qmp-quit, exit 0), `screendump` (writes a tiny PPM), CommandNotFound for the rest. On
SIGTERM, SIGINT or SIGHUP it writes QEMU's "terminating on signal N from pid P (ARGV0)"
to stderr, emits SHUTDOWN host-signal and exits 0. The console echoes what a client types
(a tty would) and prints `fake-qemu: guest running` on every `cont` from prelaunch.

Faults, asked for with words on the kernel command line (so each VM carries its own):

  fakeqemu.exit=N            exit with status N at once, before QMP (a QEMU refusing its
                             options), with a line on stderr
  fakeqemu.hang=WHAT         stop answering QMP at WHAT: `greeting` (accept, never greet),
                             `capabilities`, or a command name; the process lives on
  fakeqemu.crash=CMD:SIGNAL  on command CMD, die of SIGNAL (e.g. cont:SIGSEGV); no core
  fakeqemu.error=CMD         answer CMD with a GenericError
  fakeqemu.drop=CMD          on the first CMD, close the QMP connection without a reply
                             (the monitor then takes the next client)
  fakeqemu.powerdown=ignore  the guest ignores the ACPI power button
  fakeqemu.sigterm=ignore    SIGTERM is ignored (only SIGKILL ends it)

Stdlib only, one thread for signals: it starts in tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time

PROGRAM = "qemu-system-x86_64"  # what QEMU prefixes its stderr lines with
GREETING: dict[str, object] = {
    "QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake-qemu"}, "capabilities": ["oob"]},
}
TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GUEST_BANNER = b"fake-qemu: guest running\r\n"


def parse_opts(text: str) -> dict[str, str]:
    """A QemuOpts string ("socket,id=x,path=a,,b") as a dict; the implied first key is ''."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    opts: dict[str, str] = {}
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if sep:
            opts[key] = value
        elif index == 0:
            opts[""] = part
    return opts


def split_json(buffer: bytes) -> tuple[bytes | None, bytes]:
    """The first complete top-level JSON value in `buffer` and the rest. QEMU's parser is a
    JSON stream (json-streamer.c), not lines: qemu.qmp sends no newline at all."""
    depth = 0
    in_string = escaped = False
    for index, byte in enumerate(buffer):
        char = chr(byte)
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return buffer[: index + 1], buffer[index + 1 :]
    return None, buffer


class Options:
    """What the fake takes from QEMU's command line."""

    def __init__(self, argv: list[str]) -> None:
        self.prelaunch = False
        self.qmp_fd: int | None = None
        self.console_fd: int | None = None
        self.console_log: str | None = None
        self.faults: dict[str, str] = {}
        args = iter(argv)
        for arg in args:
            if arg == "-S":
                self.prelaunch = True
            elif arg == "-chardev":
                opts = parse_opts(next(args))
                if opts.get("id") == "vmspawn-qmp" and "fd" in opts:
                    self.qmp_fd = int(opts["fd"])
                elif opts.get("id") == "console" and "fd" in opts:
                    self.console_fd = int(opts["fd"])
                    self.console_log = opts.get("logfile")
            elif arg == "-append":
                for word in next(args).split():
                    key, sep, value = word.partition("=")
                    if sep and key.startswith("fakeqemu."):
                        self.faults[key.removeprefix("fakeqemu.")] = value


def log(message: str) -> None:
    os.write(2, f"{PROGRAM}: {message}\n".encode())


def sender_name(pid: int) -> str:
    """QEMU names a signal's sender by its argv[0] (qemu_get_pid_name)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace") or "<unknown process>"
    except OSError:
        return "<unknown process>"


class FakeQemu:
    """One "VM": its run state, its QMP monitor and console chardev, served by one selector
    loop (and one thread that turns terminating signals into loop events)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.faults = options.faults
        self.status = "prelaunch" if options.prelaunch else "running"
        self.selector = selectors.DefaultSelector()
        self.qmp_listener: socket.socket | None = None
        self.qmp: socket.socket | None = None
        self.qmp_buffer = b""
        self.negotiated = False
        self.hung = False
        self.dropped: set[str] = set()
        self.console_listener: socket.socket | None = None
        self.console: socket.socket | None = None
        self.console_log: int | None = None
        self.signals_r, self.signals_w = os.pipe()

    # --- setup ----------------------------------------------------------------------
    def setup(self) -> None:
        if self.options.qmp_fd is not None:
            self.qmp_listener = socket.socket(fileno=self.options.qmp_fd)
            self.qmp_listener.setblocking(False)  # accept never waits: the selector said so, or nothing
            self.selector.register(self.qmp_listener, selectors.EVENT_READ, self.accept_qmp)
        if self.options.console_fd is not None:
            self.console_listener = socket.socket(fileno=self.options.console_fd)
            self.console_listener.setblocking(False)
            self.selector.register(self.console_listener, selectors.EVENT_READ, self.accept_console)
        if self.options.console_log:
            self.console_log = os.open(self.options.console_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        threading.Thread(target=self.wait_signals, args=(watched_signals(),), daemon=True).start()
        self.selector.register(self.signals_r, selectors.EVENT_READ, self.on_signal)

    def wait_signals(self, watched: list[int]) -> None:
        while True:
            info = signal.sigwaitinfo(watched)
            os.write(self.signals_w, f"{info.si_signo} {info.si_pid}\n".encode())

    # --- QMP ------------------------------------------------------------------------
    def accept_qmp(self) -> None:
        assert self.qmp_listener is not None
        try:
            conn, _ = self.qmp_listener.accept()
        except BlockingIOError:
            return
        conn.settimeout(10)
        self.qmp, self.qmp_buffer, self.negotiated = conn, b"", False
        # One client at a time, as QEMU's chardev: the next waits in the backlog.
        self.selector.unregister(self.qmp_listener)
        if self.faults.get("hang") == "greeting":
            self.hung = True
            return
        self.selector.register(conn, selectors.EVENT_READ, self.read_qmp)
        self.send(GREETING)

    def close_qmp(self) -> None:
        if self.qmp is not None:
            if not self.hung:
                self.selector.unregister(self.qmp)
            self.qmp.close()
            self.qmp = None
            if self.qmp_listener is not None:
                self.selector.register(self.qmp_listener, selectors.EVENT_READ, self.accept_qmp)

    def send(self, message: dict[str, object]) -> None:
        if self.qmp is None or self.hung:
            return
        try:
            self.qmp.sendall(json.dumps(message).encode() + b"\r\n")
        except OSError:
            self.close_qmp()

    def event(self, name: str, data: dict[str, object] | None = None) -> None:
        """Events reach a negotiated client only; QEMU drops them while none is connected."""
        if not self.negotiated:
            return
        now = time.time()
        message: dict[str, object] = {"timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}, "event": name}
        if data is not None:
            message["data"] = data
        self.send(message)

    def read_qmp(self) -> None:
        assert self.qmp is not None
        try:
            chunk = self.qmp.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self.close_qmp()
            return
        self.qmp_buffer += chunk
        while self.qmp is not None and not self.hung:
            message, self.qmp_buffer = split_json(self.qmp_buffer)
            if message is None:
                break
            try:
                request = json.loads(message)
            except ValueError as exc:
                self.reply({}, error=("GenericError", f"JSON parse error, {exc}"))
                continue
            self.command(request if isinstance(request, dict) else {})

    def reply(self, request: dict[str, object], result: object = None, error: tuple[str, str] | None = None) -> None:
        message: dict[str, object] = {"return": {} if result is None else result}
        if error is not None:
            message = {"error": {"class": error[0], "desc": error[1]}}
        if "id" in request:
            message["id"] = request["id"]
        self.send(message)

    def command(self, request: dict[str, object]) -> None:
        name = str(request.get("execute") or request.get("exec-oob"))
        hang = self.faults.get("hang")
        if hang == name or (hang == "capabilities" and name == "qmp_capabilities"):
            self.hung = True  # the monitor stops reading; the connection stays open
            self.selector.unregister(self.qmp)  # type: ignore[arg-type]
            return
        crash = self.faults.get("crash", "")
        if crash.partition(":")[0] == name:
            self.crash(getattr(signal, crash.partition(":")[2] or "SIGSEGV"))
        if self.faults.get("drop") == name and name not in self.dropped:
            self.dropped.add(name)
            self.close_qmp()
            return
        if self.faults.get("error") == name:
            self.reply(request, error=("GenericError", f"fake failure of {name} (fakeqemu.error)"))
            return
        if name == "qmp_capabilities":
            if self.negotiated:
                self.reply(request, error=("CommandNotFound", "Capabilities negotiation is already complete, command ignored"))
            else:
                self.negotiated = True
                self.reply(request)
            return
        if not self.negotiated:
            self.reply(request, error=("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"))
            return
        handler = getattr(self, "qmp_" + name.replace("-", "_"), None)
        if handler is None:
            self.reply(request, error=("CommandNotFound", f"The command {name} has not been found"))
            return
        handler(request)

    def qmp_query_status(self, request: dict[str, object]) -> None:
        self.reply(request, {"status": self.status, "singlestep": False, "running": self.status == "running"})

    def qmp_cont(self, request: dict[str, object]) -> None:
        first_boot = self.status == "prelaunch"
        self.status = "running"
        self.reply(request)
        self.event("RESUME")
        if first_boot:
            self.guest_output(GUEST_BANNER)

    def qmp_stop(self, request: dict[str, object]) -> None:
        self.status = "paused"
        self.reply(request)
        self.event("STOP")

    def qmp_system_reset(self, request: dict[str, object]) -> None:
        self.reply(request)
        self.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def qmp_system_powerdown(self, request: dict[str, object]) -> None:
        self.reply(request)
        self.event("POWERDOWN")
        if self.status == "running" and self.faults.get("powerdown") != "ignore":
            self.shutdown({"guest": True, "reason": "guest-shutdown"})

    def qmp_quit(self, request: dict[str, object]) -> None:
        self.reply(request)
        self.shutdown({"guest": False, "reason": "host-qmp-quit"})

    def qmp_screendump(self, request: dict[str, object]) -> None:
        arguments = request.get("arguments")
        assert isinstance(arguments, dict)
        with open(str(arguments["filename"]), "wb") as f:
            f.write(b"P6\n1 1\n255\n\0\0\0")
        self.reply(request)

    # --- the end ----------------------------------------------------------------------
    def shutdown(self, data: dict[str, object]) -> None:
        self.event("SHUTDOWN", data)
        if self.console_log is not None:
            os.close(self.console_log)
        sys.exit(0)

    def crash(self, signo: int) -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the daemon's cwd
        signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signo])
        os.kill(os.getpid(), signo)
        signal.pause()

    def on_signal(self) -> None:
        for line in os.read(self.signals_r, 4096).decode().splitlines():
            signo, pid = (int(word) for word in line.split())
            log(f"terminating on signal {signo} from pid {pid} ({sender_name(pid)})")
            self.shutdown({"guest": False, "reason": "host-signal"})

    # --- console --------------------------------------------------------------------------
    def accept_console(self) -> None:
        assert self.console_listener is not None
        try:
            conn, _ = self.console_listener.accept()
        except BlockingIOError:
            return
        conn.settimeout(10)
        self.console = conn
        self.selector.unregister(self.console_listener)
        self.selector.register(conn, selectors.EVENT_READ, self.read_console)

    def read_console(self) -> None:
        assert self.console is not None
        try:
            data = self.console.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(self.console)
            self.console.close()
            self.console = None
            assert self.console_listener is not None
            self.selector.register(self.console_listener, selectors.EVENT_READ, self.accept_console)
            return
        self.guest_output(data)  # the guest's tty echoes

    def guest_output(self, data: bytes) -> None:
        """QEMU logs every byte and passes it to a connected client (dropped without one).

        A client that connected but was not accepted yet is accepted first: the fake's
        guest writes the instant it runs, where a real guest takes a while, and the daemon
        connects its console before `cont` for exactly that first byte."""
        if self.console is None and self.console_listener is not None:
            self.accept_console()
        if self.console_log is not None:
            os.write(self.console_log, data)
        if self.console is not None:
            try:
                self.console.sendall(data)
            except OSError:
                pass

    # --- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        self.setup()
        while True:
            for key, _mask in self.selector.select():
                # One callback may consume what a later one in the same batch was woken for
                # (cont accepts a waiting console client): skip what is no longer registered.
                current = self.selector.get_map().get(key.fd)
                if current is not None and current.data == key.data:
                    key.data()


def watched_signals() -> list[int]:
    return [s for s in TERMINATING if signal.getsignal(s) is not signal.SIG_IGN]


def main(argv: list[str]) -> int:
    options = Options(argv)
    if options.faults.get("sigterm") == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Blocked from the start and taken synchronously by one thread (FakeQemu.wait_signals):
    # sigwaitinfo names the sender, which a Python signal handler cannot.
    signal.pthread_sigmask(signal.SIG_BLOCK, watched_signals())
    if "exit" in options.faults:
        log(f"fake QEMU exits with status {options.faults['exit']} as asked (fakeqemu.exit)")
        return int(options.faults["exit"])
    FakeQemu(options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
