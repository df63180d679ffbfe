# SPDX-License-Identifier: LGPL-2.1-or-later
"""VMs of the vmspawnd installed in a system-tier container, seen from the host.

The daemon inside is reached through the container's root (/proc/LEADER/root/...), so the
host's test clients — the event stream, the console reader — work on it unchanged, and
waits are on events, not on polls of `vmspawnctl status`.
"""

from __future__ import annotations

import contextlib
import json
import select
import time
from collections.abc import Iterator

from vmspawnctl.varlink import Connection, JsonObject, VarlinkError

from tests.support import MANAGER, Console, EventStream
from tests.system.container import Container
from tests.system.deploy import Installation

SOCKET = "/run/vmspawnd/io.vmspawnd.Manager"
BOOT_TIMEOUT = 240.0


class Remote:
    """The daemon inside a container, as tests.support's helpers expect a daemon to be."""

    def __init__(self, container: Container, socket: str = SOCKET) -> None:
        self.container = container
        self.address = str(container.path(socket))

    def connect(self, timeout: float = 300.0) -> Connection:
        return Connection(self.address, timeout=timeout)

    def call(self, method: str, params: dict[str, object] | None = None, timeout: float = 300.0) -> JsonObject:
        with self.connect(timeout) as conn:
            return conn.call(f"{MANAGER}.{method}", params or {})

    def describe(self, name: str) -> JsonObject:
        machine: JsonObject = self.call("Describe", {"name": name})["machine"]
        return machine

    def events(self, name: str | None = None) -> EventStream:
        return EventStream(self, name)

    def console(self, machine: JsonObject) -> Console:
        """The VM's console, read from the host (its paths translated into the container)."""
        c = self.container
        return Console(
            {
                **machine,
                "consoleLog": str(c.path(str(machine["consoleLog"]))),
                "runtimeDirectory": str(c.path(str(machine["runtimeDirectory"]))),
            }
        )


def start_vm(
    c: Container,
    inst: Installation,
    name: str,
    *options: str,
    mode: str = "wait",
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> JsonObject:
    """`vmspawnctl start` the busybox test guest inside (TCG); returns its record."""
    c.run(
        [
            "vmspawnctl",
            "start",
            "-M",
            name,
            "--kvm=no",
            "--ram=256M",
            f"--linux={inst.kernel}",
            f"--initrd={inst.initrd}",
            *options,
            f"vmspawnd_test.mode={mode}",
        ],
        timeout=300,
        user=user,
        env=env,
    )
    machine: JsonObject = json.loads(c.run(["vmspawnctl", "status", name, "--json"], user=user, env=env).stdout)
    return machine


def wait_booted(remote: Remote, machine: JsonObject) -> None:
    """Until the guest's init handles ACPI (acpid runs): power-off tests rely on it."""
    with remote.console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running", BOOT_TIMEOUT)


def wait_in_log(remote: Remote, machine: JsonObject, offset: int, needle: bytes, timeout: float = BOOT_TIMEOUT) -> None:
    """Until the VM's console log has `needle` past `offset` (QEMU logs each byte once;
    the console stream only serves as the wake-up). The log outlives the VM."""
    log = remote.container.path(str(machine["consoleLog"]))

    def logged() -> bool:
        return needle in log.read_bytes()[offset:]

    if logged():
        return
    try:
        console = remote.console(machine)
    except VarlinkError as exc:  # the VM has ended: its log is all there is
        assert exc.short_name == "NotConnected" and logged(), f"{machine['name']}: no {needle!r} on the console"
        return
    with console:
        deadline = time.monotonic() + timeout
        while not logged():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{machine['name']}: no {needle!r} on the console"
            if select.select([console.sock], [], [], min(remaining, 1.0))[0] and not console.sock.recv(65536):
                assert logged(), f"{machine['name']}: the console closed without {needle!r}"


def log_size(remote: Remote, machine: JsonObject) -> int:
    return remote.container.path(str(machine["consoleLog"])).stat().st_size


@contextlib.contextmanager
def ends(remote: Remote, name: str, within: float = 120.0) -> Iterator[JsonObject]:
    """Run the block, then wait for `name` to reach stopped/failed; yields a dict that holds
    the final record (`["machine"]`) and how long it took (`["seconds"]`) afterwards."""
    result: dict[str, object] = {}
    with remote.events(name) as events:
        started = time.monotonic()
        yield result
        deadline = started + within
        while True:
            event = events.next()
            if event["machine"] == name and event["event"] == "StateChanged" and event["data"]["state"] in ("stopped", "failed"):
                break
            assert time.monotonic() < deadline, f"{name} did not end within {within:g}s"
        result["seconds"] = time.monotonic() - started
    result["machine"] = remote.describe(name)


def processes(c: Container) -> dict[int, dict[str, object]]:
    """Every process inside: pid -> {ppid, comm, cgroup} (the unified cgroup path, or
    systemd's named hierarchy on a hybrid host), read from /proc in one command."""
    script = r"""
import json, os
out = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        continue
    fields = stat[stat.rindex(")") + 2:].split()
    paths = {l.split(":", 2)[1]: l.split(":", 2)[2] for l in lines}
    out[pid] = {"ppid": int(fields[1]), "state": fields[0], "comm": stat[stat.index("(") + 1:stat.rindex(")")],
                "cgroup": paths.get("", paths.get("name=systemd", ""))}
print(json.dumps(out))
"""
    data = json.loads(c.run(["python3", "-c", script]).stdout)
    return {int(pid): info for pid, info in data.items()}


def descendants(table: dict[int, dict[str, object]], roots: list[int]) -> list[int]:
    found: list[int] = []
    queue = list(roots)
    while queue:
        pid = queue.pop(0)
        if pid in found or pid not in table:
            continue
        found.append(pid)
        queue += [p for p, info in table.items() if info["ppid"] == pid]
    return found


def vm_processes(c: Container, machine: JsonObject) -> dict[int, dict[str, object]]:
    """The VM's processes (reaper, QEMU, helpers and all their children) and where they run."""
    table = processes(c)
    roots = [int(machine["reaper"]["pid"]), int(machine["qemu"]["pid"])]
    roots += [int(p["pid"]) for p in machine["helpers"].values()]
    return {pid: table[pid] for pid in descendants(table, roots)}
