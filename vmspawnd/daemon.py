# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd's entry point: runtime directory and lock, sockets, sd_notify, signals.

The system instance (root) lives in /run/vmspawnd, a user instance in
$XDG_RUNTIME_DIR/vmspawnd. Only the peer that owns the instance may call it: root for
the system socket (mode 0666, so others get a typed PermissionDenied rather than
EACCES), the owner for a user instance.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from vmspawnd import __version__
from vmspawnd.host import sdnotify
from vmspawnd.host.identity import DEFAULT_COUNT, DEFAULT_FIRST, IdRange, parse_range
from vmspawnd.host.peer import owner_only
from vmspawnd.runtime_dir import MANAGER_SOCKET_NAME, bind_listening_socket, default_runtime_dir
from vmspawnd.settings import Settings

_log = logging.getLogger("vmspawnd")


class AlreadyRunning(RuntimeError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vmspawnd",
        description="Supervise virtual machines spawned like systemd-vmspawn, over Varlink.",
    )
    parser.add_argument(
        "--runtime-dir", type=Path, help="state and sockets (default: /run/vmspawnd as root, $XDG_RUNTIME_DIR/vmspawnd otherwise)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="persistent state: snapshot bundles in STATE_DIR/snapshots (default: RUNTIME_DIR/snapshots; "
        "the system unit passes /var/lib/vmspawnd)",
    )
    parser.add_argument(
        "--listen", type=Path, help="manager socket path when not socket-activated (default: RUNTIME_DIR/io.vmspawnd.Manager)"
    )
    parser.add_argument(
        "--stop-vms-on-exit", action="store_true", help="power off all VMs when the daemon stops (default: leave them running)"
    )
    parser.add_argument(
        "--notify-transport",
        choices=["vsock", "unix"],
        default="vsock",
        help="where guests report readiness: vsock (what guests can reach), or unix: an AF_UNIX "
        "socket per VM at machines/ID/notify, for hosts without vsock (tests, development)",
    )
    parser.add_argument(
        "--qemu-user",
        choices=["per-vm", "root"],
        default="per-vm",
        help="system instance: run each VM's QEMU and swtpm as a uid of its own, sandboxed and without "
        "capabilities (per-vm, the default), or as root like systemd-vmspawn (docs/security.md); "
        "a user instance always runs them as its user",
    )
    parser.add_argument(
        "--vm-id-range",
        type=parse_range,
        default=IdRange(),
        metavar="FIRST-LAST",
        help=f"the uids/gids VMs get with --qemu-user=per-vm (default {DEFAULT_FIRST:#x}-{DEFAULT_FIRST + DEFAULT_COUNT - 1:#x})",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"vmspawnd {__version__}")
    return parser.parse_args(argv)


def confinement_range(args: argparse.Namespace) -> IdRange | None:
    """The ids VMs run as: only the system instance (root) confines, unless told not to."""
    if os.geteuid() != 0 or args.qemu_user == "root":
        return None
    ids: IdRange = args.vm_id_range
    return ids


def take_lock(runtime_dir: Path) -> int:
    """One daemon per runtime directory: an flock held for the daemon's lifetime."""
    fd = os.open(runtime_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another vmspawnd (pid {holder}) already uses runtime directory {runtime_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def manager_socket(args: argparse.Namespace, runtime_dir: Path) -> socket.socket:
    activated = sdnotify.listen_fds()
    if "varlink" in activated:
        return activated["varlink"][0]
    path = args.listen or runtime_dir / MANAGER_SOCKET_NAME
    return bind_listening_socket(path, 0o666)


async def serve(args: argparse.Namespace) -> int:
    from vmspawnd.manager import Manager
    from vmspawnd.varlink.machine_instance import machine_instance_servers
    from vmspawnd.varlink.manager_api import serve_manager

    runtime_dir = args.runtime_dir or default_runtime_dir()
    runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    lock_fd = take_lock(runtime_dir)
    # Only the instance's owner may call, on the manager socket and on every VM's.
    settings = Settings(
        notify_transport=args.notify_transport,
        serve_control=machine_instance_servers(owner_only),
        vm_ids=confinement_range(args),
        snapshot_dir=args.state_dir / "snapshots" if args.state_dir else None,
    )
    manager = Manager(runtime_dir, settings)
    await manager.adopt_all()
    sock = manager_socket(args, runtime_dir)
    server = await serve_manager(sock, manager, owner_only)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)
    sdnotify.notify(f"READY=1\nSTATUS=Serving on {sock.getsockname() or 'activated socket'}")
    _log.info("vmspawnd %s serving, runtime directory %s", __version__, runtime_dir)
    await stop.wait()

    sdnotify.notify("STOPPING=1")
    _log.info("stopping (%s VMs)", "powering off" if args.stop_vms_on_exit else "leaving running")
    server.close()
    await manager.shutdown(stop_vms=args.stop_vms_on_exit)
    server.close_clients()
    os.close(lock_fd)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # asyncvarlink logs every cancelled in-flight call (docs/reference/libraries.md §1.6 item 6).
    logging.getLogger("asyncvarlink").setLevel(logging.CRITICAL if args.log_level != "debug" else logging.DEBUG)
    try:
        code = asyncio.run(serve(args))
    except (AlreadyRunning, RuntimeError, OSError) as exc:
        print(f"vmspawnd: {exc}", file=sys.stderr)
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
