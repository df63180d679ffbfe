# SPDX-License-Identifier: LGPL-2.1-or-later
"""Test support: a real vmspawnd in a subprocess, clients, console reading, leak checks.

Nothing here calls daemon internals: tests talk to the daemon over its socket (with
the CLI's stdlib client or python-varlink's CLI) and look at the host (/proc, files).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vmspawnctl.varlink import Connection, JsonObject

if TYPE_CHECKING:
    from tests.guest.build import Guest

MANAGER = "io.vmspawnd.Manager"
BOOT_TIMEOUT = 120.0  # TCG on 2 shared cores with OVMF: ~13 s normally, much more under load
TAG = "VMSPAWND-TEST:"


def wait_notify(sock: socket.socket, wanted: str, timeout: float) -> str:
    """Wait for a datagram containing `wanted` on a NOTIFY_SOCKET stand-in."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {wanted!r} on the notify socket within {timeout}s")
        sock.settimeout(remaining)
        data = sock.recv(4096).decode()
        if wanted in data.split("\n"):
            return data


@dataclasses.dataclass
class Daemon:
    """A vmspawnd process under test, with its runtime directory and socket."""

    process: subprocess.Popen[bytes]
    runtime_dir: Path
    socket_path: Path
    log_path: Path
    notify: socket.socket

    @property
    def address(self) -> str:
        return str(self.socket_path)

    def connect(self, timeout: float = 300.0) -> Connection:
        return Connection(self.address, timeout=timeout)

    def call(self, method: str, params: dict[str, object] | None = None, timeout: float = 300.0) -> JsonObject:
        with self.connect(timeout) as conn:
            return conn.call(f"{MANAGER}.{method}", params)

    def ctl(self, *args: str, check: bool = False, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run the real vmspawnctl entry point against this daemon."""
        env = dict(os.environ, VMSPAWN_ADDRESS=self.address)
        return subprocess.run(
            [sys.executable, "-m", "vmspawnctl.main", *args],
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_daemon(runtime_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    """Start vmspawnd and wait for READY=1 (the same signal systemd waits for)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify_path = runtime_dir.parent / f".{runtime_dir.name}.notify"
    notify_path.unlink(missing_ok=True)
    notify.bind(str(notify_path))
    socket_path = runtime_dir / "io.vmspawnd.Manager"
    log_path = runtime_dir.parent / f"{runtime_dir.name}.log"
    environment = dict(os.environ if env is None else env, NOTIFY_SOCKET=str(notify_path))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "vmspawnd.daemon", f"--runtime-dir={runtime_dir}", "--log-level=debug", *extra],
            stdout=log,
            stderr=log,
            env=environment,
        )
    daemon = Daemon(process, runtime_dir, socket_path, log_path, notify)
    try:
        wait_notify(notify, "READY=1", 30)
    except TimeoutError:
        process.kill()
        process.wait()
        raise AssertionError(f"vmspawnd did not become ready:\n{daemon.log()}") from None
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    """Terminate every VM it still has, remove them, then SIGTERM the daemon and reap it.

    Whatever goes wrong on the way, nothing of this daemon may outlive the test run: on a
    host whose PID 1 does not reap, a leftover would become a zombie (or burn CPU).
    """
    try:
        if daemon.alive():
            for machine in daemon.call("List", timeout=60)["machines"]:
                if machine["state"] not in ("stopped", "failed"):
                    with contextlib.suppress(Exception):
                        daemon.call("Terminate", {"name": machine["name"]}, timeout=60)
                with contextlib.suppress(Exception):
                    daemon.call("Remove", {"name": machine["name"]}, timeout=60)
    finally:
        if daemon.alive():
            daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
        kill_leftovers(daemon.runtime_dir)
        daemon.notify.close()
        # Not a `return` when outside pytest: in a `finally` it would swallow the exception.
        if "PYTEST_CURRENT_TEST" in os.environ:
            # Shown by pytest only when the module's last test failed: the daemon's side of it.
            print(f"--- last lines of {daemon.log_path} ---")
            print("\n".join(daemon.log().splitlines()[-150:]))


def kill_leftovers(runtime_dir: Path) -> list[int]:
    """SIGKILL processes that mention `runtime_dir` on their command line (VMs, helpers).

    Only for test teardown after something failed; returns what it had to kill.
    """
    needle = str(runtime_dir).encode()
    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    os.kill(int(entry), signal.SIGKILL)
                    killed.append(int(entry))
    return killed


def make_runtime_dir(prefix: str = "vmspawnd-test-") -> Path:
    """A runtime directory others can traverse (the socket is 0666 like the system one)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    runtime = base / "run"
    runtime.mkdir(mode=0o755)
    return runtime


def notify_as_guest(address: str, payload: bytes) -> None:
    """What a guest's systemd does on the notify channel: connect, write, close.

    Only for the AF_UNIX stand-in (`--notify-transport=unix`): no vsock on this host.
    """
    assert address.startswith("unix:"), address
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(address[len("unix:") :])
        sock.sendall(payload)


# --- console -------------------------------------------------------------------------


def open_console(address: str, name: str, mode: str = "read-only", **params: object) -> socket.socket:
    """OpenConsole over Varlink: the console stream arrives as a passed fd."""
    with Connection(address, timeout=60) as conn:
        conn.call(f"{MANAGER}.OpenConsole", {"name": name, "mode": mode, **params})
        fds = conn.take_fds()
    assert len(fds) == 1, fds
    return socket.socket(fileno=fds[0])


class Console:
    """Reads a VM's console as the guest writes it: history from the log, live from a
    read-only OpenConsole stream (the daemon holds QEMU's console socket itself).
    """

    def __init__(self, machine: JsonObject) -> None:
        self.log_path = Path(str(machine["consoleLog"]))
        runtime = Path(str(machine["runtimeDirectory"]))
        self.address = str(runtime.parent.parent / "io.vmspawnd.Manager")  # RUNTIME/machines/ID
        self.name = str(machine["name"])
        self.sock = open_console(self.address, self.name)
        self.writer: socket.socket | None = None
        self.live = b""

    def close(self) -> None:
        self.sock.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def text(self) -> str:
        history = self.log_path.read_bytes() if self.log_path.exists() else b""
        return (history + b"\n" + self.live).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        """Block on the console socket until `pattern` shows up (in history or live output)."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            if match := regex.search(self.text()):
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"console never showed {pattern!r}; last output:\n{self.text()[-3000:]}")
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if ready:
                chunk = self.sock.recv(65536)
                if not chunk:
                    if match := regex.search(self.text()):
                        return match
                    raise AssertionError(f"console closed before {pattern!r}; last output:\n{self.text()[-3000:]}")
                self.live += chunk

    def wait_count(self, needle: str, count: int, timeout: float = BOOT_TIMEOUT) -> None:
        """Block until `needle` occurs `count` times in the log (e.g. a second boot's marker)."""
        regex = "(?:[\\s\\S]*?" + re.escape(needle) + "){" + str(count) + "}"
        self.wait_for(regex, timeout)

    def send(self, text: str) -> None:
        if self.writer is None:
            self.writer = open_console(self.address, self.name, "interactive", force=True)
        self.writer.sendall(text.encode())

    def facts(self) -> dict[str, list[str]]:
        """The guest's `VMSPAWND-TEST: key value` lines, grouped by key."""
        out: dict[str, list[str]] = {}
        for line in self.text().splitlines():
            line = line.strip("\r")
            if line.startswith(TAG):
                key, _, value = line[len(TAG) :].strip().partition(" ")
                out.setdefault(key, []).append(value)
        return out


# --- host state -------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (covers zombies too)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def zombies(parents: set[int] | None = None) -> list[int]:
    """Zombie processes, optionally only those whose parent is in `parents`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if process_state(int(entry)) == "Z" and (parents is None or parent_of(int(entry)) in parents):
                    found.append(int(entry))
    return found


def qemu_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().startswith("qemu-system"):
                    pids.append(int(entry))
    return pids


def _client_connections(listening_path: str) -> set[str]:
    """Inodes of accepted connections on `listening_path` (they carry its path in /proc/net/unix)."""
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == listening_path and fields[5] == "03":
                inodes.add(fields[6])
    return inodes


def open_fds(pid: int, ignore_connections_to: str | None = None) -> list[str]:
    """What the process has open, by target, leaving out client connections to its API
    socket (each call is one, and their close reaches the daemon asynchronously).
    """
    skip = _client_connections(ignore_connections_to) if ignore_connections_to else set()
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in skip:
                continue
            targets.append(target)
    return sorted(targets)


def daemon_fds(daemon: Daemon) -> list[str]:
    return open_fds(daemon.process.pid, daemon.address)


@contextlib.contextmanager
def no_leaks(daemon: Daemon) -> Iterator[None]:
    """Assert that the block leaves the daemon's fds, children and machine dirs as they were."""
    daemon.call("List")  # a round trip: the daemon is past start-up (its READY=1 socket is closed)
    fds = daemon_fds(daemon)
    kids = sorted(children_of(daemon.process.pid))
    dirs = sorted(p.name for p in (daemon.runtime_dir / "machines").iterdir())
    yield
    assert daemon.alive(), daemon.log()[-3000:]
    assert sorted(children_of(daemon.process.pid)) == kids
    assert sorted(p.name for p in (daemon.runtime_dir / "machines").iterdir()) == dirs
    after = daemon_fds(daemon)
    assert after == fds, f"fds changed: now {after}, before {fds}"


class Reachable(Protocol):
    """A daemon whose manager socket the tests can connect to: a Daemon here, a daemon in a
    container (tests/system/vms.py's Remote) there."""

    def connect(self, timeout: float = 300.0) -> Connection: ...


class EventStream:
    """A SubscribeEvents stream; events after `__enter__` returns are never missed."""

    def __init__(self, daemon: Reachable, name: str | None = None, timeout: float = BOOT_TIMEOUT) -> None:
        self._conn = daemon.connect(timeout)
        params: dict[str, object] = {} if name is None else {"name": name}
        self._conn.send(f"{MANAGER}.SubscribeEvents", params, more=True)
        first = self._conn.receive()["parameters"]["event"]
        assert first["event"] == "Subscribed", first
        self.seen: list[JsonObject] = []

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_: object) -> None:
        self._conn.close()

    def next(self) -> JsonObject:
        event: JsonObject = self._conn.receive()["parameters"]["event"]
        self.seen.append(event)
        return event

    def wait_state(self, machine: str, *states: str) -> JsonObject:
        """Block until `machine` enters one of `states`; returns that event."""
        while True:
            event = self.next()
            if event["machine"] == machine and event["event"] == "StateChanged":
                if event["data"]["state"] in states:
                    return event

    def wait_event(self, machine: str, name: str) -> JsonObject:
        while True:
            event = self.next()
            if event["machine"] == machine and event["event"] == name:
                return event


def boot_facts(daemon: Daemon, name: str, *start_args: str, pass_name: bool = True) -> dict[str, list[str]]:
    """`vmspawnctl start -M NAME ARGS`, wait until the guest printed its facts, end the VM.

    With `pass_name=False` no -M is given: NAME is then what vmspawn's default naming must
    produce, and finding the VM under it is part of the test.
    Returns the guest's facts (see tests/guest/README.md); the VM is terminated and removed
    whatever happens, so a failing assertion leaves nothing running.
    """
    result = daemon.ctl("start", *(["-M", name] if pass_name else []), *start_args)
    assert result.returncode == 0, result.stderr
    machine = daemon.call("Describe", {"name": name})["machine"]
    try:
        with Console(machine) as console:
            console.wait_for(r"VMSPAWND-TEST: facts-done")
            return console.facts()
    finally:
        daemon.call("Terminate", {"name": name})
        daemon.call("Remove", {"name": name})


PR_SET_CHILD_SUBREAPER = 36


def set_subreaper(on: bool) -> None:
    """Make this process the reaper of its descendants' orphans (PID 1 does not reap here)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans(timeout: float = 60.0, keep: Collection[int] = ()) -> None:
    """Reap every child we adopted as subreaper, waiting (bounded) for those still running.

    `keep`: children that were ours before (a module's daemon fixture): they are not
    orphans, they run on, and waiting for them would only burn the timeout."""
    for pid in children_of(os.getpid()):
        if pid in keep:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


@contextlib.contextmanager
def orphans_reaped() -> Iterator[None]:
    """For tests whose daemon exits while its VMs run: their reapers and helpers become
    our children (not PID 1's, which would leave them zombies) and are reaped at the end."""
    ours = set(children_of(os.getpid()))
    set_subreaper(True)
    try:
        yield
    finally:
        reap_orphans(keep=ours)
        set_subreaper(False)


def waiting_spec(guest: Guest, name: str, **fields: object) -> dict[str, object]:
    """The busybox test guest as `name` (TCG, 256 MiB) idling in its `wait` mode, as a
    Spawn spec; `fields` (wire names) add to it or replace its own."""
    return {
        "name": name,
        "kvm": False,
        "ram": 256 * 1024 * 1024,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
        **fields,
    }


def spawn_waiting(daemon: Daemon, guest: Guest, name: str) -> JsonObject:
    """Spawn the busybox test guest as `name` (waiting_spec)."""
    machine: JsonObject = daemon.call("Spawn", {"spec": waiting_spec(guest, name)})["machine"]
    return machine
