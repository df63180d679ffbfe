# SPDX-License-Identifier: LGPL-2.1-or-later
"""Registration with systemd-machined and the VM's transient scope unit (docs/reference/systemd-vmspawn.md §5.1, §5.2).

The first half is pure: it builds the Varlink parameters and D-Bus messages systemd
expects, so they can be golden-tested without a bus. The second half is thin effects:

* Varlink `io.systemd.Machine.Register` first (machined's preferred API). `controlAddress`
  only exists since systemd 261; older machined refuses the unknown field with
  `org.varlink.service.InvalidParameter`, so we retry without it.
* D-Bus `org.freedesktop.machine1.Manager.RegisterMachine(sayssus)` when the Varlink
  socket is absent (ENOENT/ECONNREFUSED), as vmspawn does.
* A transient `NAME.scope` via `StartTransientUnit(ssa(sv)a(sa(sv)))` when systemd is
  the service manager, unless machined allocates it (`allocateUnit`, root only) or
  `--keep-unit` was given. `RequestStop` on the scope ends the VM.

`--register` is tri-state here (a listed deviation from 259): None = auto (try, and
skip quietly when machined is absent), True = a failure fails the start at step
"register", False = don't register. Unregistering and scope teardown only log errors:
the VM is gone by then and nothing can be done about it.

Environment (documented in docs/vmspawnd.md):
  VMSPAWND_MACHINED_ADDRESS  path of machined's Varlink socket (tests point it at a stand-in)
  VMSPAWND_SYSTEMD_BOOTED    "1"/"0" overrides the `/run/systemd/system` check
  DBUS_SYSTEM_BUS_ADDRESS / DBUS_SESSION_BUS_ADDRESS  honoured by dbus-fast
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
import signal
import socket
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import InvalidAddressError

from vmspawnd.errors import StartFailed
from vmspawnd.spec.parsers import mangle_unit_name, parse_size

_log = logging.getLogger(__name__)

SERVICE = "vmspawnd"
MACHINE_CLASS = "vm"
SYSTEM_MACHINED_ADDRESS = "/run/systemd/machine/io.systemd.Machine"
ENV_MACHINED_ADDRESS = "VMSPAWND_MACHINED_ADDRESS"
ENV_SYSTEMD_BOOTED = "VMSPAWND_SYSTEMD_BOOTED"
DEFAULT_SLICE = "machine.slice"
GUESTS_UNIT = "vmspawnd-guests.service"
CALL_TIMEOUT = 10.0
JOB_TIMEOUT = 30.0

MACHINE1 = "org.freedesktop.machine1"
MACHINE1_PATH = "/org/freedesktop/machine1"
MACHINE1_MANAGER = "org.freedesktop.machine1.Manager"
SYSTEMD1 = "org.freedesktop.systemd1"
SYSTEMD1_PATH = "/org/freedesktop/systemd1"
SYSTEMD1_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD1_SCOPE = "org.freedesktop.systemd1.Scope"

USEC_PER_SEC = 1_000_000
UINT64_MAX = 2**64 - 1
UINT32_MAX = 2**32 - 1
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


def systemd_is_service_manager(environ: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists) -> bool:
    """sd_booted(): systemd manages this system when /run/systemd/system exists."""
    override = environ.get(ENV_SYSTEMD_BOOTED)
    if override is not None:
        return override.strip().lower() in ("1", "yes", "true", "on")
    return exists("/run/systemd/system")


def bus_label_escape(text: str) -> str:
    """systemd's bus_label_escape(): object path elements allow only [A-Za-z0-9_];
    everything else becomes _XX. dbus-fast does not validate outgoing paths, and an
    invalid one makes dbus-daemon drop the whole connection (docs/reference/libraries.md §3)."""
    if not text:
        return "_"
    out = []
    for i, b in enumerate(text.encode()):
        ch = chr(b)
        if (ch.isascii() and ch.isalpha()) or (i > 0 and ch.isascii() and ch.isdigit()):
            out.append(ch)
        else:
            out.append(f"_{b:02x}")
    return "".join(out)


def unit_object_path(unit: str) -> str:
    return f"{SYSTEMD1_PATH}/unit/{bus_label_escape(unit)}"


def scope_unit_name(machine_name: str) -> str:
    return mangle_unit_name(machine_name, ".scope")


def _parse_percent(value: str) -> float | None:
    if value.endswith("%"):
        number = float(value[:-1])
        if not 0 <= number <= 100:
            raise ValueError(f"percentage out of range: {value!r}")
        return number
    return None


def _scale(percent: float) -> int:
    """systemd's UINT32_SCALE_FROM_PERMYRIAD for the *Scale properties."""
    permyriad = round(percent * 100)
    return (permyriad * UINT32_MAX + 5000) // 10000


def _limit(name: str, value: str, with_scale: bool = True) -> tuple[str, Variant]:
    """MemoryMax=/MemoryHigh=/TasksMax=: bytes or count, `infinity`, or a percentage."""
    if value in ("", "infinity"):
        return name, Variant("t", UINT64_MAX)
    percent = _parse_percent(value)
    if percent is not None:
        if not with_scale:
            raise ValueError(f"{name}= does not take a percentage")
        return f"{name}Scale", Variant("u", _scale(percent))
    if name == "TasksMax":
        if not value.isdigit() or int(value) == 0:
            raise ValueError(f"invalid TasksMax= value {value!r}")
        return name, Variant("t", int(value))
    return name, Variant("t", parse_size(value))


def _weight(name: str, value: str) -> tuple[str, Variant]:
    if value == "":
        return name, Variant("t", UINT64_MAX)
    if name in ("CPUWeight", "StartupCPUWeight") and value == "idle":
        return name, Variant("t", 0)
    if not value.isdigit() or not 1 <= int(value) <= 10000:
        raise ValueError(f"{name}= must be an integer 1…10000, got {value!r}")
    return name, Variant("t", int(value))


def _cpu_set_bytes(name: str, value: str) -> bytes:
    """AllowedCPUs=/AllowedMemoryNodes= "0-3 5,7" → systemd's cpu_set_to_dbus() bitmap."""
    bits: set[int] = set()
    for item in value.replace(",", " ").split():
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"invalid {name}= range {item!r}")
        first, last = int(low), int(high) if sep else int(low)
        if last < first or last >= 8192:
            raise ValueError(f"invalid {name}= range {item!r}")
        bits.update(range(first, last + 1))
    out = bytearray((max(bits) // 8 + 1) if bits else 0)
    for bit in bits:
        out[bit // 8] |= 1 << (bit % 8)
    return bytes(out)


_LIMITS = ("MemoryMax", "MemoryHigh", "MemoryLow", "MemoryMin", "MemorySwapMax", "TasksMax")
_WEIGHTS = ("CPUWeight", "StartupCPUWeight", "IOWeight", "StartupIOWeight")
_CHOICES = {"DevicePolicy": ("auto", "closed", "strict"), "ManagedOOMMemoryPressure": ("auto", "kill")}
SUPPORTED_PROPERTIES = (
    "AllowedCPUs", "AllowedMemoryNodes", "CPUQuota", *_WEIGHTS, "DeviceAllow", *_CHOICES, *_LIMITS, "Description",
)


def convert_unit_property(assignment: str) -> tuple[str, Variant]:
    """`--property=NAME=VALUE` → one `(sv)` of StartTransientUnit, as systemd's
    bus_append_unit_property_assignment() encodes it, for the supported subset."""
    name, sep, value = assignment.partition("=")
    if not sep:
        raise ValueError(f"not an assignment: {assignment!r}")
    if name == "Description":
        return name, Variant("s", value)
    if name == "CPUQuota":
        if value in ("", "infinity"):
            return "CPUQuotaPerSecUSec", Variant("t", UINT64_MAX)
        if not value.endswith("%"):
            raise ValueError(f"CPUQuota= must be a percentage, got {value!r}")
        percent = float(value[:-1])
        if percent <= 0:
            raise ValueError(f"CPUQuota= must be positive, got {value!r}")
        return "CPUQuotaPerSecUSec", Variant("t", round(percent * USEC_PER_SEC / 100))
    if name in _LIMITS:
        return _limit(name, value)
    if name in _WEIGHTS:
        return _weight(name, value)
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{name}= must be one of {', '.join(_CHOICES[name])}, got {value!r}")
        return name, Variant("s", value)
    if name in ("AllowedCPUs", "AllowedMemoryNodes"):
        return name, Variant("ay", _cpu_set_bytes(name, value))
    if name == "DeviceAllow":
        if value == "":
            return name, Variant("a(ss)", [])
        path, _, rwm = value.partition(" ")
        rwm = rwm.strip()
        if rwm and not set(rwm) <= set("rwm"):
            raise ValueError(f"DeviceAllow= access must be of r, w, m, got {rwm!r}")
        return name, Variant("a(ss)", [[path, rwm]])
    raise ValueError(f"unsupported unit property {name!r} (supported: {', '.join(SUPPORTED_PROPERTIES)})")


def scope_properties(
    machine_name: str,
    slice_name: str | None,
    pids: Sequence[int],
    assignments: Sequence[str],
    controller: str | None,
    pidfd_count: int = 0,
) -> list[list[object]]:
    """The `a(sv)` of StartTransientUnit for the VM's scope (docs/reference/systemd-vmspawn.md §5.2).

    With `pidfd_count` the processes go as `PIDFDs` (`ah`, indices into the message's
    fds); otherwise as `PIDs` (`au`)."""
    props: list[list[object]] = [
        ["Description", Variant("s", f"Virtual Machine {machine_name}")],
        ["CollectMode", Variant("s", "inactive-or-failed")],
        ["AddRef", Variant("b", True)],
        ["Slice", Variant("s", mangle_unit_name(slice_name or DEFAULT_SLICE, ".slice"))],
        # Stopped only after vmspawnd-guests.service powered the guest off through ACPI at
        # shutdown (stop order is the reverse of start order): without it, PID 1 would
        # SIGTERM QEMU in parallel with the power-off, as libvirt-guests avoids too.
        ["Before", Variant("as", [GUESTS_UNIT])],
    ]
    if controller:
        props.append(["Controller", Variant("s", controller)])
    if pidfd_count:
        props.append(["PIDFDs", Variant("ah", list(range(pidfd_count)))])
    else:
        props.append(["PIDs", Variant("au", list(pids))])
    for assignment in assignments:
        name, value = convert_unit_property(assignment)
        props.append([name, value])
    return props


def _systemd_call(member: str, signature: str, body: list[object], unix_fds: list[int] | None = None) -> Message:
    return Message(
        destination=SYSTEMD1, path=SYSTEMD1_PATH, interface=SYSTEMD1_MANAGER,
        member=member, signature=signature, body=body, unix_fds=unix_fds or [],
    )


def start_transient_unit_message(unit: str, properties: list[list[object]], unix_fds: list[int] | None = None) -> Message:
    return _systemd_call("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", properties, []], unix_fds)


def attach_processes_message(unit: str, pids: Sequence[int]) -> Message:
    """AttachProcessesToUnit(ssau): move processes into an existing unit's cgroup (systemd 238+)."""
    return _systemd_call("AttachProcessesToUnit", "ssau", [unit, "", list(pids)])


def kill_unit_message(unit: str, whom: str = "all", signo: int = signal.SIGKILL) -> Message:
    return _systemd_call("KillUnit", "ssi", [unit, whom, int(signo)])


def abandon_scope_message(unit: str) -> Message:
    return _systemd_call("AbandonScope", "s", [unit])


def unref_unit_message(unit: str) -> Message:
    return _systemd_call("UnrefUnit", "s", [unit])


def register_machine_message(info: RegistrationInfo) -> Message:
    """RegisterMachine(sayssus): name, id, service, class, leader, root directory."""
    return Message(
        destination=MACHINE1, path=MACHINE1_PATH, interface=MACHINE1_MANAGER, member="RegisterMachine",
        signature="sayssus",
        body=[info.name, id128_bytes(info.uuid), SERVICE, MACHINE_CLASS, info.leader_pid, info.root_directory or ""],
    )


def unregister_machine_message(name: str) -> Message:
    return Message(
        destination=MACHINE1, path=MACHINE1_PATH, interface=MACHINE1_MANAGER, member="UnregisterMachine",
        signature="s", body=[name],
    )


def add_match_message(rule: str) -> Message:
    return Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
        member="AddMatch", signature="s", body=[rule],
    )


JOB_REMOVED_MATCH = (
    f"type='signal',sender='{SYSTEMD1}',path='{SYSTEMD1_PATH}',interface='{SYSTEMD1_MANAGER}',member='JobRemoved'"
)


def request_stop_match(unit: str) -> str:
    return f"type='signal',path='{unit_object_path(unit)}',interface='{SYSTEMD1_SCOPE}',member='RequestStop'"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do for one VM, decided without I/O."""

    register: bool
    required: bool
    own_scope: bool  # a NAME.scope of ours holding every process of the VM
    join_unit: bool  # --keep-unit: every process of the VM joins the calling client's unit


def plan(register: bool | None, keep_unit: bool, systemd_booted: bool) -> Plan:
    """Units exist only where systemd manages the system. Without `--keep-unit` the VM gets
    a scope of its own, which vmspawnd creates with all of the VM's processes in it (vmspawn
    258+ asks machined to allocate it when root, but machined's scope holds only the
    leader, and the reaper, swtpm and virtiofsd would stay in vmspawnd.service); with it,
    the processes join the unit of the client that asked, as vmspawn's own processes stay
    in the unit vmspawn runs in. Registration with machined comes after, so machined
    finds the unit from the leader's cgroup."""
    wants = register is not False
    return Plan(
        register=wants, required=register is True,
        own_scope=systemd_booted and not keep_unit, join_unit=systemd_booted and keep_unit,
    )


# ---------------------------------------------------------------------------------------
# effects


class VarlinkCallError(Exception):
    """An error reply from a Varlink peer."""

    def __init__(self, error: str, parameters: Mapping[str, object]) -> None:
        super().__init__(f"{error} {json.dumps(dict(parameters))}" if parameters else error)
        self.error = error
        self.parameters = dict(parameters)


_UNAVAILABLE = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR)


_NO_SERVICE = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


def _unavailable(exc: BaseException) -> bool:
    # No bus address at all (a user instance without DBUS_SESSION_BUS_ADDRESS or XDG_RUNTIME_DIR/bus)
    # means no bus, just as a missing socket does.
    return (isinstance(exc, OSError) and exc.errno in _UNAVAILABLE) or isinstance(exc, InvalidAddressError)


async def varlink_call(
    address: str, method: str, parameters: Mapping[str, object], timeout: float = CALL_TIMEOUT,
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
        raise VarlinkCallError(reply["error"], reply.get("parameters") or {})
    return dict(reply.get("parameters") or {})


class DBusCallError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name


async def dbus_call(bus: MessageBus, message: Message, timeout: float = CALL_TIMEOUT) -> Message:
    async with asyncio.timeout(timeout):
        reply = await bus.call(message)
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise DBusCallError(reply.error_name or "unknown", text)
    return reply


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


async def _connect_bus(is_root: bool) -> MessageBus:
    """The bus of our service manager: the system bus for root, else the session bus."""
    bus_type = BusType.SYSTEM if is_root else BusType.SESSION
    async with asyncio.timeout(CALL_TIMEOUT):
        return await MessageBus(bus_type=bus_type, negotiate_unix_fd=True).connect()


def unit_delegate_message(unit: str) -> Message:
    """Properties.Get(Unit-type interface, "Delegate") on `unit`'s object (services and
    scopes both have it; any other type answers with an error)."""
    interface = f"{SYSTEMD1}.{'Scope' if unit.endswith('.scope') else 'Service'}"
    return Message(
        destination=SYSTEMD1, path=unit_object_path(unit), interface="org.freedesktop.DBus.Properties",
        member="Get", signature="ss", body=[interface, "Delegate"],
    )


async def unit_is_delegated(unit: str, is_root: bool) -> bool:
    """Whether PID 1 lets other processes join `unit` (AttachProcessesToUnit works only on
    units with Delegate=yes). Raises OSError/TimeoutError/DBusCallError when it cannot tell."""
    bus = await _connect_bus(is_root)
    try:
        reply = await dbus_call(bus, unit_delegate_message(unit))
    finally:
        bus.disconnect()
    value = reply.body[0]
    return bool(value.value if isinstance(value, Variant) else value)


class Registration:
    """What was registered and allocated for one VM; `close()` undoes it, logging failures."""

    def __init__(self, name: str, is_root: bool) -> None:
        self.name = name
        self.is_root = is_root
        self.varlink_address: str | None = None  # registered over Varlink here
        self.dbus_registered = False
        self.scope_unit: str | None = None  # allocated by us (stopped in close())
        self.unit: str | None = None  # the unit holding the VM's processes: our scope or the caller's
        self.bus: MessageBus | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def registered(self) -> bool:
        return self.varlink_address is not None or self.dbus_registered

    async def bus_connection(self) -> MessageBus:
        if self.bus is None:
            self.bus = await _connect_bus(self.is_root)
        return self.bus

    async def close(self) -> None:
        """Unregister and drop the scope: AbandonScope, KillUnit(all, SIGKILL), UnrefUnit (docs/reference/systemd-vmspawn.md §5.2)."""
        if self._closed:
            return
        self._closed = True
        if self.varlink_address is not None:
            try:
                await varlink_call(self.varlink_address, "io.systemd.Machine.Unregister", {"name": self.name})
            except (OSError, TimeoutError, VarlinkCallError, ValueError) as exc:
                _log.warning("%s: could not unregister from machined: %s", self.name, exc)
        if self.dbus_registered:
            await self._quietly(unregister_machine_message(self.name), "unregister from machined")
        if self.scope_unit is not None:
            for message in (
                abandon_scope_message(self.scope_unit),
                kill_unit_message(self.scope_unit),
                unref_unit_message(self.scope_unit),
            ):
                await self._quietly(message, f"{message.member} {self.scope_unit}", debug=True)
        # A running stop request is not awaited: it waits for the VM's end, which is what
        # called us (it finishes on its own; _tasks keeps it referenced until then).
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            self.bus = None

    async def _quietly(self, message: Message, what: str, debug: bool = False) -> None:
        try:
            bus = await self.bus_connection()
            await dbus_call(bus, message)
        except (OSError, TimeoutError, DBusCallError, Exception) as exc:  # noqa: BLE001 - teardown only logs
            (_log.debug if debug else _log.warning)("%s: could not %s: %s", self.name, what, exc)

    def _run(self, callback: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            try:
                await callback()
            except Exception:  # noqa: BLE001 - a stop request racing the VM's own end
                _log.debug("%s: stop request handler failed", self.name, exc_info=True)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _varlink_register(info: RegistrationInfo, address: str, connection: socket.socket | None = None) -> None:
    """Register; a machined older than 261 refuses `controlAddress` → once more without.

    `connection` is the reaper's own connection to machined (machined makes the peer the
    VM's supervisor); the retry, which needs a second connection, is the daemon's."""
    params = varlink_register_parameters(info)
    try:
        await varlink_call(address, "io.systemd.Machine.Register", params, connection=connection)
    except VarlinkCallError as exc:
        if "controlAddress" not in params or exc.error != "org.varlink.service.InvalidParameter":
            raise
        if exc.parameters.get("parameter") not in (None, "controlAddress"):
            raise
        _log.debug("%s: machined does not know controlAddress (systemd < 261), registering without", info.name)
        await varlink_call(address, "io.systemd.Machine.Register", varlink_register_parameters(info, False))


async def _start_scope(
    registration: Registration,
    info: RegistrationInfo,
    slice_name: str | None,
    assignments: Sequence[str],
    pids: Sequence[int],
    on_request_stop: Callable[[], Awaitable[object]] | None,
) -> None:
    """StartTransientUnit NAME.scope holding `pids`, and wait for its job (docs/reference/systemd-vmspawn.md §5.2)."""
    unit = scope_unit_name(info.name)
    bus = await registration.bus_connection()
    unit_path = unit_object_path(unit)
    finished: dict[str, str] = {}
    changed = asyncio.Event()

    def on_message(message: Message) -> None:
        if message.message_type != MessageType.SIGNAL:
            return
        if message.interface == SYSTEMD1_MANAGER and message.member == "JobRemoved" and message.signature == "uoss":
            finished[message.body[1]] = message.body[3]
            changed.set()
        elif message.interface == SYSTEMD1_SCOPE and message.member == "RequestStop" and message.path == unit_path:
            _log.info("%s: VM termination requested by the service manager", info.name)
            if on_request_stop is not None:
                registration._run(on_request_stop)

    bus.add_message_handler(on_message)
    await dbus_call(bus, add_match_message(JOB_REMOVED_MATCH))
    await dbus_call(bus, add_match_message(request_stop_match(unit)))

    pidfds: list[int] = []
    try:
        for pid in pids:
            pidfds.append(os.pidfd_open(pid))
    except OSError:
        for fd in pidfds:
            os.close(fd)
        pidfds = []
    try:
        try:
            props = scope_properties(info.name, slice_name, pids, assignments, bus.unique_name, len(pidfds))
            reply = await dbus_call(bus, start_transient_unit_message(unit, props, pidfds or None))
        except DBusCallError as exc:
            if not pidfds or exc.name not in (
                "org.freedesktop.DBus.Error.UnknownProperty", "org.freedesktop.DBus.Error.PropertyReadOnly",
                "org.freedesktop.systemd1.UnknownProperty",
            ):
                raise
            _log.debug("%s: the service manager does not take PIDFDs (%s), using PIDs", info.name, exc)
            props = scope_properties(info.name, slice_name, pids, assignments, bus.unique_name)
            reply = await dbus_call(bus, start_transient_unit_message(unit, props))
    finally:
        for fd in pidfds:
            os.close(fd)
    registration.scope_unit = unit
    job = reply.body[0]
    async with asyncio.timeout(JOB_TIMEOUT):
        while job not in finished:
            changed.clear()
            await changed.wait()
    if finished[job] != "done":
        raise DBusCallError("org.freedesktop.systemd1.JobFailed", f"starting {unit} ended with {finished[job]!r}")


async def register_machine(
    info: RegistrationInfo,
    *,
    register: bool | None,
    keep_unit: bool = False,
    caller_unit: str | None = None,
    slice_name: str | None = None,
    properties: Sequence[str] = (),
    pids: Sequence[int] = (),
    on_request_stop: Callable[[], Awaitable[object]] | None = None,
    is_root: bool | None = None,
    systemd_booted: bool | None = None,
    environ: Mapping[str, str] | None = None,
    adopting: bool = False,
    machined_connection: socket.socket | None = None,
) -> Registration:
    """Put every process of the VM in its unit, then register the VM with machined (per
    `plan()`); `info.leader_pid` is the leader machined signals (the reaper).

    `pids` are all of the VM's processes; `caller_unit` is the unit of the client that
    asked for `--keep-unit`. `adopting`: a restarted daemon takes the VM back; its
    processes are in their unit already and only the registration is renewed. Raises StartFailed at step "scope", "keep-unit" or "register"
    when a required part fails; with auto registration an absent machined is skipped
    quietly and other failures logged. Whatever was done before a failure is undone
    before raising."""
    env = os.environ if environ is None else environ
    root = os.geteuid() == 0 if is_root is None else is_root
    booted = systemd_is_service_manager(env) if systemd_booted is None else systemd_booted
    steps = plan(register, keep_unit, booted)
    registration = Registration(info.name, root)
    if info.leader_pid and info.leader_pidfd_id is None:
        info = dataclasses.replace(info, leader_pidfd_id=pidfd_id(info.leader_pid))
    processes = list(pids or [info.leader_pid])
    problems: list[str] = []
    try:
        if not adopting:  # an adopted VM's processes stayed in their unit across the restart
            await _place_processes(registration, steps, info, caller_unit, slice_name, properties, processes, on_request_stop)
        if steps.register:
            await _register(registration, info, root, env, problems, exists_ok=adopting, connection=machined_connection)
        if steps.register and not registration.registered:
            if steps.required:
                raise StartFailed("register", "could not register with systemd-machined: " + "; ".join(problems or ["not reachable"]))
            if problems:
                _log.warning("%s: not registered with systemd-machined: %s", info.name, "; ".join(problems))
            else:
                _log.debug("%s: systemd-machined is not running, not registering", info.name)
        elif registration.registered:
            _log.info("%s: registered with systemd-machined over %s", info.name, "Varlink" if registration.varlink_address else "D-Bus")
    except BaseException:
        await registration.close()
        raise
    finally:
        if machined_connection is not None:
            machined_connection.close()  # used for Register, or not needed
    if registration.scope_unit is None and registration.bus is not None:
        # Nothing to watch on the bus: don't hold a connection per VM.
        registration.bus.disconnect()
        registration.bus = None
    return registration


async def _place_processes(
    registration: Registration,
    steps: Plan,
    info: RegistrationInfo,
    caller_unit: str | None,
    slice_name: str | None,
    properties: Sequence[str],
    processes: Sequence[int],
    on_request_stop: Callable[[], Awaitable[object]] | None,
) -> None:
    """Every process of the VM into its own scope, or (--keep-unit) into the caller's unit."""
    if steps.own_scope:
        try:
            await _start_scope(registration, info, slice_name, properties, processes, on_request_stop)
        except (OSError, TimeoutError, DBusCallError, ValueError) as exc:
            raise StartFailed("scope", f"could not create {scope_unit_name(info.name)}: {exc}") from exc
        registration.unit = registration.scope_unit
    elif steps.join_unit:
        if not caller_unit:
            raise StartFailed("keep-unit", "the calling client runs in no unit of the service manager")
        try:
            bus = await registration.bus_connection()
            await dbus_call(bus, attach_processes_message(caller_unit, processes))
        except (OSError, TimeoutError, DBusCallError, InvalidAddressError) as exc:
            raise StartFailed("keep-unit", f"could not move the VM's processes into {caller_unit}: {exc}") from exc
        registration.unit = caller_unit


async def _register(
    registration: Registration, info: RegistrationInfo, root: bool, env: Mapping[str, str], problems: list[str],
    exists_ok: bool, connection: socket.socket | None = None,
) -> None:
    """io.systemd.Machine.Register, or RegisterMachine on D-Bus where machined has no
    Varlink socket. With `exists_ok` (a restarted daemon registering a VM it adopted,
    whose registration machined may have kept) a machine of that name counts as ours."""
    address = machined_address(env, root)
    try:
        await _varlink_register(info, address, connection)
        registration.varlink_address = address
        return
    except VarlinkCallError as exc:
        if exists_ok and exc.error == "io.systemd.Machine.MachineExists":
            registration.varlink_address = address
            return
        problems.append(f"io.systemd.Machine.Register at {address}: {exc}")
        return
    except (OSError, TimeoutError, ValueError) as exc:
        if not _unavailable(exc):
            problems.append(f"io.systemd.Machine.Register at {address}: {exc}")
            return
        _log.debug("%s: machined's Varlink socket %s is absent (%s), trying D-Bus", info.name, address, exc)
    try:
        bus = await registration.bus_connection()
        await dbus_call(bus, register_machine_message(info))
        registration.dbus_registered = True
    except DBusCallError as exc:
        if exists_ok and exc.name == "org.freedesktop.machine1.MachineExists":
            registration.dbus_registered = True
        elif exc.name in _NO_SERVICE:
            _log.debug("%s: machined is not on the bus either (%s)", info.name, exc)
        else:
            problems.append(f"org.freedesktop.machine1 RegisterMachine: {exc}")
    except (OSError, TimeoutError, InvalidAddressError) as exc:
        if _unavailable(exc):
            _log.debug("%s: machined is not on the bus either (%s)", info.name, exc)
        else:
            problems.append(f"org.freedesktop.machine1 RegisterMachine: {exc}")


def info_for(record: object, spec: object, leader_pid: int, vsock_cid: int | None = None) -> RegistrationInfo:
    """RegistrationInfo from the machine's record and spec; fields the record may or may not
    carry (vsock CID, SSH key, control socket) are read when present."""
    cid = vsock_cid if vsock_cid is not None else getattr(record, "vsock_cid", None)
    return RegistrationInfo(
        name=getattr(record, "name"),  # noqa: B009 - record is any object with these fields
        uuid=getattr(spec, "uuid", None),
        leader_pid=leader_pid,
        root_directory=getattr(spec, "directory", None),
        vsock_cid=cid if isinstance(cid, int) and cid > 2 else None,
        ssh_private_key_path=getattr(record, "ssh_private_key_path", None) or None,
        control_address=getattr(record, "control_address", None) or None,
    )
