# SPDX-License-Identifier: LGPL-2.1-or-later
"""`vmspawnctl run`: systemd-vmspawn's foreground behaviour on top of the daemon.

Start the VM (Spawn), bind its life to this process (HoldMachine: if `run` dies, even
by SIGKILL, the daemon terminates the VM and forgets it, so the name is free again),
attach the console in the requested mode and wait for the VM to end. Ctrl-]×3
terminates the VM; SIGINT, SIGTERM and SIGRTMIN+4 power it off (ACPI, escalating
after the daemon's deadline), as vmspawn does. The exit status is the guest's
EXIT_STATUS= when it sent one, 0 after a clean stop, 1 when QEMU failed (vmspawn
exits 0 there: upstream #41378).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import sys
import threading
import typing
from collections.abc import Mapping

from . import output
from .console import Relay, Terminated, open_console, raw_terminal, signals_raise, write_all
from .varlink import INTERFACE, Connection, ConnectionFailed, JsonObject, VarlinkError

if typing.TYPE_CHECKING:  # the shapes of the replies, for the type checker only: free at run time
    from vmspawnd.spec.wire import MachineJson, VmSpecJson

POWER_OFF_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGRTMIN + 4)
VMSPAWN_HUE = 130.0  # systemd-vmspawn tints green-ish (nspawn cyan, run0 red)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """`run` takes exactly `start`'s options (--background included)."""
    from .start_options import add_start_options

    add_start_options(parser)


def hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    """systemd's hsv_to_rgb() (color-util.c): saturation and value in percent, and each
    channel truncated, not rounded, to 0…255, so the tint is the very one vmspawn sends."""
    hue = math.fmod(hue, 360)
    c = (saturation / 100.0) * (value / 100.0)
    x = c * (1 - abs(math.fmod(hue / 60.0, 2) - 1))
    m = (value / 100) - c
    sector = [(c, x, 0.0), (x, c, 0.0), (0.0, c, x), (0.0, x, c), (x, 0.0, c), (c, 0.0, x)][min(int(hue // 60), 5)]
    red, green, blue = (int((channel + m) * 255) for channel in sector)
    return red, green, blue


def default_tint() -> str:
    """vmspawn's tint for a dark terminal: systemd's terminal_tint_color(130) with the
    saturation (75 %) and value (at least 20 %) it picks for a dark background: 48;2;12;51;19.

    systemd derives saturation and value from the terminal's actual background (an
    OSC 11 query); we assume a black one rather than wait on a terminal reply.
    """
    red, green, blue = hsv_to_rgb(VMSPAWN_HUE, 75, 20)
    return f"48;2;{red};{green};{blue}"


def default_tint_if_wanted(env: Mapping[str, str] | None = None) -> str:
    """The default tint, unless colour is off ($NO_COLOR, $SYSTEMD_COLORS=0, TERM=dumb: systemd
    queries no background colour then, so it tints nothing) or $SYSTEMD_TINT_BACKGROUND is
    false. An explicit --background is the user's own choice and not subject to this."""
    env = os.environ if env is None else env
    if not output.colour_enabled(sys.stdout, env):
        return ""
    if output.parse_boolean_env(env.get("SYSTEMD_TINT_BACKGROUND")) is False:
        return ""
    return default_tint()


def sd_notify(message: str) -> None:
    """Forward to $NOTIFY_SOCKET, as vmspawn under a Type=notify unit (stdlib only)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)


def _boot_path(spec: VmSpecJson) -> str:
    for key in ("image", "directory", "linux"):
        if path := spec.get(key):
            return str(path)
    return "-"


def exit_code(machine: dict[str, object]) -> int:
    """The guest's EXIT_STATUS if it sent one, else 0 for a clean stop, else 1 (QEMU failed)."""
    status = machine.get("exitStatus")
    if isinstance(status, int):
        return status
    if machine.get("state") == "stopped":
        return 0
    tail = str(machine.get("stderrTail") or "").strip()
    print(f"vmspawnctl run: {machine.get('name')}: {machine.get('reason')}" + (f"\n{tail}" if tail else ""), file=sys.stderr)
    return 1


class _Signals:
    """Signals become bytes on a pipe, so the relay's select() sees them."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._previous = {s: signal.signal(s, self._handler) for s in POWER_OFF_SIGNALS}

    def _handler(self, signo: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(self.write_fd, bytes([signo]))

    def close(self) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        os.close(self.read_fd)
        os.close(self.write_fd)


def run_vm(args: argparse.Namespace, address: str) -> int:
    from .start_spec import spec_from_args

    spec = spec_from_args(args).to_json()
    mode = str(spec.get("console") or "interactive")
    # One call spawns the VM and binds its life to this process: whenever `run` dies, even
    # during the start, the daemon ends the VM.
    hold = Connection(address)
    try:
        hold.send(f"{INTERFACE}.SpawnAndHold", {"spec": spec}, more=True)
        machine: MachineJson | None = hold.receive().get("parameters", {}).get("machine")
        assert isinstance(machine, dict)
        return _foreground(args, address, machine, mode, hold)
    finally:
        hold.close()


def _foreground(args: argparse.Namespace, address: str, machine: MachineJson, mode: str, hold: Connection) -> int:
    name = machine["name"]
    attached = mode in ("interactive", "read-only", "native")
    if not args.quiet and mode != "gui":
        print(f"Spawning VM {name} on {_boot_path(machine.get('spec') or {})}.", file=sys.stderr)
        if mode == "interactive":  # as vmspawn: a read-only console takes no keys at all
            print("Press Ctrl-] three times within 1s to kill VM.", file=sys.stderr)
        elif mode == "native":
            print("Press Ctrl-a x to kill VM.", file=sys.stderr)
        sys.stderr.flush()
    if not args.quiet and machine.get("displayAddress"):
        print(f"Display of VM {name}: vnc+unix://{machine['displayAddress']} (for example: remote-viewer).", file=sys.stderr)
    qemu = machine.get("qemu")
    pid = qemu["pid"] if qemu else None
    sd_notify(f"STATUS=VM started.\nX_VMSPAWN_LEADER_PID={pid}")
    _notify_ready_when_ready(address, name, bool(machine.get("ready")))

    sock = None
    if attached:
        with Connection(address) as conn:
            sock = open_console(conn, name, "read-only" if mode == "read-only" else "interactive")
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    tint = ""
    if attached and mode != "native" and os.isatty(stdout):
        tint = default_tint_if_wanted() if args.background is None else args.background
    final: dict[str, object] = {}
    signals = _Signals()
    control: list[Connection] = []  # PowerOff calls in flight; their replies are not awaited

    def on_signal() -> bool:
        with contextlib.suppress(BlockingIOError):
            os.read(signals.read_fd, 64)
        try:
            conn = Connection(address)
            conn.send(f"{INTERFACE}.PowerOff", {"name": name})
            control.append(conn)
        except ConnectionFailed:
            pass
        return False

    def on_hold() -> bool:
        with contextlib.suppress(VarlinkError, ConnectionFailed):
            parameters: JsonObject = hold.receive().get("parameters", {})
            final.update(parameters.get("machine") or {})
        return True

    relay = Relay(
        sock,
        interactive=mode != "read-only",
        stdin=stdin if (attached and (mode != "read-only" or os.isatty(stdin))) else None,
        stdout=stdout,
    )
    relay.extra = {signals.read_fd: on_signal, hold.fileno(): on_hold}
    try:
        if tint:
            write_all(stdout, f"\033[{tint}m\033[K".encode())
        with signals_raise(signal.SIGHUP), raw_terminal(stdin) if attached else contextlib.nullcontext():
            reason = relay.run()
            if reason == "escape":
                with contextlib.suppress(VarlinkError), Connection(address) as conn:
                    conn.call(f"{INTERFACE}.Terminate", {"name": name})
                on_hold()
            relay.drain()
    except Terminated:
        return 128 + signal.SIGHUP  # the hold connection closes: the daemon ends the VM
    finally:
        if tint:
            write_all(stdout, b"\033[0m\033[K")
        signals.close()
        for conn in control:
            conn.close()
        if sock is not None:
            sock.close()
    if attached and os.isatty(stdout):
        write_all(stdout, b"\r\n")
    if not final:
        with contextlib.suppress(VarlinkError), Connection(address) as conn:
            final = dict(conn.call(f"{INTERFACE}.Describe", {"name": name})["machine"])
    code = exit_code(final)
    with contextlib.suppress(VarlinkError, ConnectionFailed), Connection(address) as conn:
        conn.call(f"{INTERFACE}.Remove", {"name": name})  # vmspawn leaves no trace: free the name
    return code


def _notify_ready_when_ready(address: str, name: str, ready: bool) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    if ready:
        sd_notify("READY=1")
        return

    def wait() -> None:
        with contextlib.suppress(VarlinkError, ConnectionFailed, OSError), Connection(address) as conn:
            conn.call(f"{INTERFACE}.WaitReady", {"name": name, "timeout": 86400})
            sd_notify("READY=1")

    threading.Thread(target=wait, daemon=True, name="wait-ready").start()
