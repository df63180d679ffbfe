# SPDX-License-Identifier: LGPL-2.1-or-later
"""Registration with systemd-machined (docs/reference/systemd-vmspawn.md §5.1).

The pure half builds what machined is told, the Varlink parameters and the D-Bus
messages, golden-tested without machined. The effects are thin:

* Varlink `io.systemd.Machine.Register` first (machined's preferred API). `controlAddress`
  only exists since systemd 261; older machined refuses the unknown field with
  `org.varlink.service.InvalidParameter`, so we retry without it.
* D-Bus `org.freedesktop.machine1.Manager.RegisterMachine(sayssus)` when the Varlink
  socket is absent (ENOENT/ECONNREFUSED), as vmspawn does.

Environment (documented in docs/vmspawnd.md):
  VMSPAWND_MACHINED_ADDRESS  path of machined's Varlink socket (tests point it at a stand-in)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import functools
import json
import logging
import os
import socket
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus
from dbus_fast.errors import InvalidAddressError

from vmspawnd.errors import DBusCallError, VarlinkCallError
from vmspawnd.host.dbus import CALL_TIMEOUT, dbus_call

if TYPE_CHECKING:
    from vmspawnd.model import MachineRecord
    from vmspawnd.spec import VmSpec

_log = logging.getLogger(__name__)

SERVICE = "vmspawnd"
MACHINE_CLASS = "vm"
SYSTEM_MACHINED_ADDRESS = "/run/systemd/machine/io.systemd.Machine"
ENV_MACHINED_ADDRESS = "VMSPAWND_MACHINED_ADDRESS"

MACHINE1 = "org.freedesktop.machine1"
MACHINE1_PATH = "/org/freedesktop/machine1"
MACHINE1_MANAGER = "org.freedesktop.machine1.Manager"

PID_FS_MAGIC = 0x50494446

# ---------------------------------------------------------------------------------------
# pure part


@dataclasses.dataclass(frozen=True)
class RegistrationInfo:
    """Everything machined is told about one VM."""

    name: str
    uuid: str | None = None  # canonical RFC form or 32 hex digits
    leader_pid: int = 0
    leader_pidfd_id: int | None = None
    root_directory: str | None = None
    vsock_cid: int | None = None
    ssh_private_key_path: str | None = None
    allow_interactive_authentication: bool | None = None
    control_address: str | None = None


def info_for(record: MachineRecord, spec: VmSpec, leader_pid: int, vsock_cid: int | None = None) -> RegistrationInfo:
    """RegistrationInfo from the machine's record and spec. `vsock_cid` is the guest's CID
    when it has one (the record does not keep it); 0-2 are no guest's, so they are left out.
    Empty strings in the record mean "none"."""
    return RegistrationInfo(
        name=record.name,
        uuid=spec.uuid,
        leader_pid=leader_pid,
        root_directory=spec.directory,
        vsock_cid=vsock_cid if vsock_cid is not None and vsock_cid > 2 else None,
        ssh_private_key_path=record.ssh_private_key_path or None,
        control_address=record.control_address or None,
    )


def id128_hex(value: str | None) -> str | None:
    """machined's `id` field: the UUID as 32 lower-case hex digits (sd_id128 format)."""
    if not value:
        return None
    return uuid_module.UUID(value).hex


def id128_bytes(value: str | None) -> bytes:
    """RegisterMachine's `ay` id: 16 bytes, or empty when there is none (machined allows that)."""
    if not value:
        return b""
    return uuid_module.UUID(value).bytes


def varlink_register_parameters(info: RegistrationInfo, with_control_address: bool = True) -> dict[str, object]:
    """Parameters of io.systemd.Machine.Register; unset optional fields are left out,
    because older machined rejects fields it does not know."""
    params: dict[str, object] = {"name": info.name}
    if (machine_id := id128_hex(info.uuid)) is not None:
        params["id"] = machine_id
    params["service"] = SERVICE
    params["class"] = MACHINE_CLASS
    if info.leader_pid:
        leader: dict[str, object] = {"pid": info.leader_pid}
        if info.leader_pidfd_id is not None:
            leader["pidfdId"] = info.leader_pidfd_id
        params["leaderProcessId"] = leader
    if info.root_directory:
        params["rootDirectory"] = info.root_directory
    if info.vsock_cid is not None:
        params["vSockCid"] = info.vsock_cid
        params["sshAddress"] = f"vsock/{info.vsock_cid}"
    if info.ssh_private_key_path:
        params["sshPrivateKeyPath"] = info.ssh_private_key_path
    if info.allow_interactive_authentication is not None:
        params["allowInteractiveAuthentication"] = info.allow_interactive_authentication
    if with_control_address and info.control_address:
        params["controlAddress"] = info.control_address
    return params


def varlink_frame(method: str, parameters: Mapping[str, object]) -> bytes:
    """One Varlink call on the wire: a JSON object terminated by NUL."""
    return json.dumps({"method": method, "parameters": dict(parameters)}).encode() + b"\0"


def machined_address(environ: Mapping[str, str], is_root: bool) -> str:
    """Where machined's Varlink socket is: the override, the system path for root, else the
    user instance's (systemd 260+)."""
    if override := environ.get(ENV_MACHINED_ADDRESS):
        return override
    if is_root or not environ.get("XDG_RUNTIME_DIR"):
        return SYSTEM_MACHINED_ADDRESS
    return os.path.join(environ["XDG_RUNTIME_DIR"], "systemd/machine/io.systemd.Machine")


def register_machine_message(info: RegistrationInfo) -> Message:
    """RegisterMachine(sayssus): name, id, service, class, leader, root directory."""
    return Message(
        destination=MACHINE1,
        path=MACHINE1_PATH,
        interface=MACHINE1_MANAGER,
        member="RegisterMachine",
        signature="sayssus",
        body=[info.name, id128_bytes(info.uuid), SERVICE, MACHINE_CLASS, info.leader_pid, info.root_directory or ""],
    )


def unregister_machine_message(name: str) -> Message:
    return Message(
        destination=MACHINE1,
        path=MACHINE1_PATH,
        interface=MACHINE1_MANAGER,
        member="UnregisterMachine",
        signature="s",
        body=[name],
    )


# ---------------------------------------------------------------------------------------
# effects


_UNAVAILABLE = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR)


_NO_SERVICE = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


def _unavailable(exc: BaseException) -> bool:
    # No bus address at all (a user instance without DBUS_SESSION_BUS_ADDRESS or XDG_RUNTIME_DIR/bus)
    # means no bus, just as a missing socket does.
    return (isinstance(exc, OSError) and exc.errno in _UNAVAILABLE) or isinstance(exc, InvalidAddressError)


async def varlink_call(
    address: str,
    method: str,
    parameters: Mapping[str, object],
    timeout: float = CALL_TIMEOUT,
    connection: socket.socket | None = None,
) -> dict[str, Any]:
    """One Varlink call on a fresh connection (or on `connection`, already connected, which
    it then owns), bounded. A dozen lines of stdlib are enough for two calls per VM, and
    they keep machined's field names exactly as written."""
    async with asyncio.timeout(timeout):
        if connection is not None:
            reader, writer = await asyncio.open_unix_connection(sock=connection)
        else:
            reader, writer = await asyncio.open_unix_connection(address)
        try:
            writer.write(varlink_frame(method, parameters))
            await writer.drain()
            data = await reader.readuntil(b"\0")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    reply = json.loads(data[:-1])
    if "error" in reply:
        raise VarlinkCallError(reply["error"], dict(reply.get("parameters") or {}))
    return dict(reply.get("parameters") or {})


async def varlink_register(info: RegistrationInfo, address: str, connection: socket.socket | None = None) -> None:
    """Register; a machined older than 261 refuses `controlAddress` → once more without.

    `connection` is the reaper's own connection to machined (machined makes the peer the
    VM's supervisor); the retry, which needs a second connection, is the daemon's."""
    params = varlink_register_parameters(info)
    try:
        await varlink_call(address, "io.systemd.Machine.Register", params, connection=connection)
    except VarlinkCallError as exc:
        if "controlAddress" not in params or exc.error != "org.varlink.service.InvalidParameter":
            raise
        if exc.reply_parameters.get("parameter") not in (None, "controlAddress"):
            raise
        _log.debug("%s: machined does not know controlAddress (systemd < 261), registering without", info.name)
        await varlink_call(address, "io.systemd.Machine.Register", varlink_register_parameters(info, False))


@dataclasses.dataclass(frozen=True)
class MachinedResult:
    """How `register_with_machined` went: registered over Varlink at `varlink_address`, or
    over D-Bus; or neither, with machined's `problem`, or none when machined is absent."""

    varlink_address: str | None = None
    dbus_registered: bool = False
    problem: str = ""


async def register_with_machined(
    info: RegistrationInfo,
    address: str,
    bus_connection: Callable[[], Awaitable[MessageBus]],
    *,
    exists_ok: bool,
    connection: socket.socket | None = None,
) -> MachinedResult:
    """io.systemd.Machine.Register at `address`, or RegisterMachine on D-Bus (on the bus
    `bus_connection` gives, which the caller owns) where machined has no Varlink socket.
    With `exists_ok` (a restarted daemon registering a VM it adopted, whose registration
    machined may have kept) a machine of that name counts as ours."""
    try:
        await varlink_register(info, address, connection)
        return MachinedResult(varlink_address=address)
    except VarlinkCallError as exc:
        if exists_ok and exc.error == "io.systemd.Machine.MachineExists":
            return MachinedResult(varlink_address=address)
        return MachinedResult(problem=f"io.systemd.Machine.Register at {address}: {exc}")
    except (OSError, TimeoutError, ValueError) as exc:
        if not _unavailable(exc):
            return MachinedResult(problem=f"io.systemd.Machine.Register at {address}: {exc}")
        _log.debug("%s: machined's Varlink socket %s is absent (%s), trying D-Bus", info.name, address, exc)
    try:
        bus = await bus_connection()
        await dbus_call(bus, register_machine_message(info))
        return MachinedResult(dbus_registered=True)
    except DBusCallError as exc:
        if exists_ok and exc.name == "org.freedesktop.machine1.MachineExists":
            return MachinedResult(dbus_registered=True)
        if exc.name in _NO_SERVICE:
            _log.debug("%s: machined is not on the bus either (%s)", info.name, exc)
            return MachinedResult()
        return MachinedResult(problem=f"org.freedesktop.machine1 RegisterMachine: {exc}")
    except (OSError, TimeoutError, InvalidAddressError) as exc:
        if _unavailable(exc):
            _log.debug("%s: machined is not on the bus either (%s)", info.name, exc)
            return MachinedResult()
        return MachinedResult(problem=f"org.freedesktop.machine1 RegisterMachine: {exc}")


@functools.cache
def _libc() -> ctypes.CDLL:
    """Loaded once: find_library runs `ldconfig -p` in a subprocess (7 % of a Spawn)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def pidfd_id(pid: int) -> int | None:
    """The pidfd inode number systemd uses as `pidfdId`; only meaningful on pidfs
    (Linux ≥ 6.9), where it is unique — elsewhere None, as systemd leaves it out."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = _libc()
        buf = ctypes.create_string_buffer(256)
        if libc.fstatfs(fd, buf) != 0:
            return None
        if ctypes.c_long.from_buffer(buf).value != PID_FS_MAGIC:
            return None
        return os.fstat(fd).st_ino
    except OSError:
        return None
    finally:
        os.close(fd)
