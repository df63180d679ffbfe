# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the daemon prepares around a QEMU it launches, and how a start step waits on it.

Machine.start runs the steps; the pieces here need no machine state: the sockets the daemon
binds for QEMU (so there is no connect race and a restarted daemon reconnects by path), the
payload directory for secrets, where a gui VM's display goes, the guest's notify channel, the
options of the reaper that leads the VM, and `unless_exits`, which fails a start step fast
when QEMU dies under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from vmspawnd.errors import StartFailed
from vmspawnd.host.confinement import unprivileged_prefix
from vmspawnd.host.identity import VmIdentity, hand_over
from vmspawnd.host.machined import machined_address
from vmspawnd.host.process import ReapedProcess, read_tail
from vmspawnd.outcome import describe_exit, qemu_error_line
from vmspawnd.qemu.command import QemuCommand
from vmspawnd.qemu.console import History
from vmspawnd.qemu.guest_notify import MessageCallback, NotifyListener, open_unix_listener, open_vsock_listener
from vmspawnd.qemu.resources import HostResources, Resources
from vmspawnd.runtime_dir import VmPaths, bind_listening_socket, make_private_dir
from vmspawnd.spec import ConsoleMode, VmSpec

T = TypeVar("T")

STDERR_TAIL_BYTES = 2048
EXIT_SETTLE = 2.0  # a step that failed while QEMU exits: how long to let the exit show


def bind_qemu_sockets(spec: VmSpec, paths: VmPaths, stack: contextlib.AsyncExitStack) -> dict[str, socket.socket]:
    """QMP always, the console unless it is gui or headless; closed by `stack` on failure."""
    wanted = ["qmp"]
    if ConsoleMode(spec.console) not in (ConsoleMode.GUI, ConsoleMode.HEADLESS):
        wanted.append("console")
        History.create(paths.console_log)
    sockets = {}
    for name in wanted:
        sock = bind_listening_socket(paths.socket(name), 0o600)
        stack.callback(sock.close)
        sockets[name] = sock
    return sockets


class FdsForQemu:
    """The daemon's copies of the fds it opened for QEMU (vhost-vsock, TAP, files): QEMU's
    once passed, so closed right after the spawn, or on any failure before it."""

    def __init__(self, host: HostResources) -> None:
        fds = [host.vhost_vsock_fd, host.tap_fd, *(fd for fds in host.file_fds.values() for fd in fds)]
        self._fds = [fd for fd in fds if fd is not None]

    def add(self, fds: tuple[int, ...]) -> tuple[int, ...]:
        """Fds opened later (a clone's overlay), closed with the rest."""
        self._fds += fds
        return fds

    def close(self) -> None:
        """Idempotent: the start stack calls it again on failure."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def confine(argv: list[str], identity: VmIdentity | None, kvm: bool) -> list[str]:
    """QEMU's argv, run as the VM's identity without capabilities (host/confinement.py);
    with KVM it keeps /dev/kvm's group, which gives access to that device alone."""
    if identity is None:
        return argv
    groups = [os.stat("/dev/kvm").st_gid] if kvm and os.path.exists("/dev/kvm") else []
    return [*unprivileged_prefix(identity, groups), *argv]


def as_seen_from_vm_dir(res: Resources, directory: Path) -> Resources:
    """The VM's own files as a confined QEMU names them: relative to its working
    directory, the VM's directory. machines/ (0700 root) lies above it, and the VM's id may
    not search it; a relative path from the working directory needs no search permission
    on the directories above it."""

    def inside(path: str | None) -> str | None:
        if path is None or not Path(path).is_relative_to(directory):
            return path
        return str(Path(path).relative_to(directory))

    shares = tuple(dataclasses.replace(s, socket_path=inside(s.socket_path) or s.socket_path) for s in res.virtiofs)
    return dataclasses.replace(
        res,
        console_log=inside(res.console_log) or res.console_log,
        payload_dir=inside(res.payload_dir),
        display_socket=inside(res.display_socket),
        tpm_socket=inside(res.tpm_socket),
        kernel=inside(res.kernel),
        initrd=inside(res.initrd),
        virtiofs=shares,
    )


def hand_over_channels(paths: VmPaths, command: QemuCommand, identity: VmIdentity) -> None:
    """What a confined QEMU opens by path in the VM's directory: the SMBIOS payloads
    (read) and the console log (appended to)."""
    if command.files:
        hand_over(paths.payload, identity)
    for path in command.files:
        hand_over(paths.directory / path, identity)
    if paths.console_log.exists():
        hand_over(paths.console_log, identity)


def make_payload_dir(paths: VmPaths) -> Path:
    """SMBIOS payloads (credentials may be secrets): 0600 files in a 0700 directory,
    passed to QEMU with path= so nothing secret shows in /proc/PID/cmdline."""
    make_private_dir(paths.payload)
    return paths.payload


def display_socket(spec: VmSpec, paths: VmPaths, gui_window: bool) -> str | None:
    """--console=gui: a VNC socket, unless QEMU's window can open in the daemon's session."""
    if spec.console != ConsoleMode.GUI or gui_window:
        return None
    return str(paths.display)


def leader_options(spec: VmSpec, paths: VmPaths, deadline: float) -> list[str]:
    """How the reaper, registered as the VM's leader, reaches us or QEMU, and where it
    connects to machined for the registration (host/reaper.py)."""
    options = [f"--control={paths.control}", f"--qmp={paths.qmp}", f"--deadline={deadline:g}"]
    if spec.register is not False:
        options.append(f"--machined={machined_address(os.environ, os.geteuid() == 0)}")
    return options


async def open_notify_listener(
    transport: str, paths: VmPaths, vsock_cid: int | None, notify_ready: bool, on_message: MessageCallback, name: str
) -> tuple[NotifyListener | None, str]:
    """The guest's notify channel (started), and where readiness comes from, in words.

    With vsock the guest gets the address as the vmm.notify_socket credential. Without it
    nothing in the guest can report readiness, so running counts as ready (vmspawn never
    signals READY there at all: a documented deviation). `transport="unix"` is the AF_UNIX
    stand-in for hosts without vhost-vsock (tests).
    """
    if transport == "unix":
        sock, address = open_unix_listener(paths.notify)
    elif vsock_cid is not None:
        sock, address = open_vsock_listener()
    else:
        return None, "running (no vsock: the guest cannot report readiness)"
    listener = NotifyListener(sock, address, on_message, name)
    await listener.start()
    return listener, "guest (READY=1 over the notify socket)" if notify_ready else "running (--notify-ready=no)"


def stderr_tail(paths: VmPaths) -> str:
    return read_tail(paths.qemu_log, STDERR_TAIL_BYTES)


async def unless_exits(qemu: ReapedProcess, awaitable: Awaitable[T], step: str, paths: VmPaths, stop_reason: str | None) -> T:
    """Await a start step, but fail fast (StartFailed with QEMU's stderr) if QEMU dies meanwhile."""
    work = asyncio.ensure_future(awaitable)
    exited = asyncio.ensure_future(qemu.wait())
    try:
        await asyncio.wait({work, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if work.done() and not work.cancelled() and work.exception() is None:
        return work.result()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
    # Either QEMU exited, or the step failed (most likely because QEMU is exiting).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(EXIT_SETTLE):
            await qemu.wait()
    if qemu.exited:
        tail = stderr_tail(paths)
        message = stop_reason or describe_exit(qemu.returncode)
        if stop_reason is None and (error := qemu_error_line(tail)):
            message += f": {error}"  # QEMU refused its arguments or a file: its own words
        raise StartFailed(step, message, tail)
    exc = work.exception()
    assert exc is not None
    raise exc
