# SPDX-License-Identifier: LGPL-2.1-or-later
"""Start one helper (swtpm, virtiofsd, journal-remote) on a socket the daemon bound.

systemd-vmspawn 259 wraps each helper in `systemd-socket-activate --listen PATH` and waits
for READY=1 through fork_notify. The daemon gets the same guarantee more simply: it binds
and listens on the socket itself before the helper exists, and passes the listening fd. By
the time QEMU connects the socket is there (the kernel queues the connection until the
helper accepts), so nothing ever polls for a socket file to appear.

Helpers run like QEMU (vmspawnd.process.spawn_detached): own session, no parent-death
signal, tracked by pidfd while the daemon is their parent, output appended to a per-helper
log in the VM directory. Teardown is registered on the caller's exit stack, so helpers
stop in reverse order of start: SIGTERM, a bounded wait, then SIGKILL, always reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from vmspawnd.host.process import ChildProcess, children_of, spawn_detached
from vmspawnd.runtime_dir import bind_listening_socket

HELPER_TERM_GRACE = 5.0


def log_path(directory: Path, name: str) -> Path:
    """Where helper `name` writes its stdout and stderr (kept with the VM's other logs)."""
    return directory / f"{name}.log"


def listen_unix(path: Path, stack: contextlib.AsyncExitStack) -> socket.socket:
    """Bind a private (0600) listening socket; the socket file goes when the VM ends."""
    sock = bind_listening_socket(path, 0o600)
    stack.callback(_unlink_quietly, path)
    return sock


def start_helper(
    name: str,
    argv: Sequence[str],
    *,
    directory: Path,
    stack: contextlib.AsyncExitStack,
    listen: socket.socket | None = None,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    grace: float = HELPER_TERM_GRACE,
) -> ChildProcess:
    """Spawn `argv` as helper `name` and register its stop on `stack`.

    `listen` (if given) is passed at its own fd number, which `argv` must already name, and
    is closed here once the helper holds it: the helper is then the only owner of the
    listening socket, so if it dies QEMU's connection attempts fail instead of hanging.
    """
    fds = list(pass_fds)
    if listen is not None:
        fds.append(listen.fileno())
    try:
        child = spawn_detached(name, argv, pass_fds=fds, log_path=log_path(directory, name), env=env)
    finally:
        if listen is not None:
            listen.close()
    stack.push_async_callback(stop_helper, child, grace)
    return child


async def stop_helper(child: ChildProcess, grace: float = HELPER_TERM_GRACE) -> None:
    """SIGTERM → `grace` seconds → SIGKILL, and wait until it is reaped.

    virtiofsd (both dialects, in its default namespace sandbox) forks: the process we
    started only waits for a worker in a new pid namespace and exits with its status. A
    SIGTERM to that waiter would orphan the worker (it gets SIGTERM by parent-death signal
    and is left to PID 1 to reap). So the helper's own children are asked to stop first;
    the waiter then reaps its worker and exits by itself. Whatever still runs after
    `grace` gets SIGKILL, to the helper's whole process group (its own session).
    """
    if child.exited:
        await child.wait()  # already reaped by the pidfd callback; nothing to signal
        return
    workers = children_of(child.pid)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if not workers:
        child.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await child.wait()
            return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    await child.terminate(grace)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
