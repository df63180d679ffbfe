# SPDX-License-Identifier: LGPL-2.1-or-later
"""The one exception tree of vmspawnd.

Every error a client can see is a subclass of `VmspawnError`; `api` maps each to the
Varlink error `io.vmspawnd.Manager.<ClassName>` with `parameters()` as its parameters.
The private `_InternalError` branch is not part of the API (not in ALL_ERRORS, not in the
IDL): the daemon's own calls to other services fail with these, and the caller translates
them where it makes the call. This module is pure (no asyncio, no asyncvarlink) so that
the CLI can share the names.

    VmspawnError
     ├── InvalidSpec{field, reason}        a spec value is malformed or unusable
     ├── NoSuchMachine{name}
     ├── MachineExists{name}
     ├── InvalidState{name, state, operation}   e.g. Remove of a running VM
     ├── StartFailed{step, message, stderrTail} the VM could not be started; all unwound
     ├── PermissionDenied{}                the peer may not use this socket or VM
     ├── Timeout{operation}                a bounded wait ran out (QEMU wedged, guest slow)
     ├── NotConnected{name}                QMP to this VM is gone
     ├── NotSupported{feature}             valid, but not implemented here
     ├── ProtocolViolation{reason}         a frame that is not a Varlink call
     ├── ConsoleBusy{name}                 another client holds the interactive console
 ├── NoSuchSnapshot{bundle}            no snapshot bundle of that name or path
 ├── SnapshotIncompatible{bundle, options, reason}   a snapshot cannot be taken or restored so
     └── _InternalError                    private: never sent as itself (InternalError{message})
          ├── VarlinkCallError{error, replyParameters}   machined answered a Varlink call with an error
          └── DBusCallError{name, text}    systemd (PID 1, machine1) answered a D-Bus call with an error
"""

from __future__ import annotations

import dataclasses
import json

from vmspawnd import override

INTERFACE = "io.vmspawnd.Manager"


@dataclasses.dataclass
class VmspawnError(Exception):
    """Root of all errors that cross the API; subclasses are dataclasses of their parameters."""

    def __post_init__(self) -> None:
        Exception.__init__(self, str(self))

    @classmethod
    def varlink_name(cls) -> str:
        return f"{INTERFACE}.{cls.__name__}"

    def parameters(self) -> dict[str, object]:
        """Parameters on the wire, lowerCamelCase like systemd's."""
        return {to_camel(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @override
    def __str__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"{type(self).__name__}({params})"


@dataclasses.dataclass
class InvalidSpec(VmspawnError):
    field: str
    reason: str

    @override
    def __str__(self) -> str:
        return f"invalid {self.field}: {self.reason}"


@dataclasses.dataclass
class NoSuchMachine(VmspawnError):
    name: str

    @override
    def __str__(self) -> str:
        return f"no machine named {self.name!r}"


@dataclasses.dataclass
class MachineExists(VmspawnError):
    name: str

    @override
    def __str__(self) -> str:
        return f"a machine named {self.name!r} already exists (remove it first if it stopped)"


@dataclasses.dataclass
class InvalidState(VmspawnError):
    name: str
    state: str
    operation: str

    @override
    def __str__(self) -> str:
        return f"cannot {self.operation} machine {self.name!r} while it is {self.state}"


@dataclasses.dataclass
class StartFailed(VmspawnError):
    step: str
    message: str
    stderr_tail: str = ""

    @override
    def __str__(self) -> str:
        text = f"start failed at {self.step}: {self.message}"
        if self.stderr_tail:
            text += f"\n{self.stderr_tail.rstrip()}"
        return text


@dataclasses.dataclass
class PermissionDenied(VmspawnError):
    @override
    def __str__(self) -> str:
        return "permission denied"


@dataclasses.dataclass
class Timeout(VmspawnError):
    operation: str

    @override
    def __str__(self) -> str:
        return f"timed out: {self.operation}"


@dataclasses.dataclass
class NotConnected(VmspawnError):
    name: str

    @override
    def __str__(self) -> str:
        return f"no QMP connection to machine {self.name!r}"


@dataclasses.dataclass
class NotSupported(VmspawnError):
    feature: str

    @override
    def __str__(self) -> str:
        return f"not supported: {self.feature}"


@dataclasses.dataclass
class ProtocolViolation(VmspawnError):
    reason: str

    @override
    def __str__(self) -> str:
        return f"protocol violation: {self.reason}"


@dataclasses.dataclass
class ConsoleBusy(VmspawnError):
    """Another client holds the VM's interactive console (take it over with force)."""

    name: str


@dataclasses.dataclass
class NoSuchSnapshot(VmspawnError):
    bundle: str

    @override
    def __str__(self) -> str:
        return f"no snapshot bundle {self.bundle!r}"


@dataclasses.dataclass
class SnapshotIncompatible(VmspawnError):
    """A snapshot cannot be taken of this VM, or a clone cannot be restored from this bundle
    as asked: `options` names what stands in the way (spec fields or QEMU options)."""

    bundle: str
    options: list[str]
    reason: str

    @override
    def __str__(self) -> str:
        named = f" ({', '.join(self.options)})" if self.options else ""
        return f"snapshot {self.bundle!r}: {self.reason}{named}"


@dataclasses.dataclass
class _InternalError(VmspawnError):
    """A call the daemon makes to another service failed; the caller catches and translates
    it. Should one escape, a client sees only `InternalError{message}`, as for any
    unexpected exception, never a name the IDL does not declare."""

    @classmethod
    @override
    def varlink_name(cls) -> str:
        return f"{INTERFACE}.InternalError"

    @override
    def parameters(self) -> dict[str, object]:
        return {"message": str(self)}


@dataclasses.dataclass
class VarlinkCallError(_InternalError):
    """An error reply from a Varlink peer (machined)."""

    error: str
    reply_parameters: dict[str, object] = dataclasses.field(default_factory=dict)

    @override
    def __str__(self) -> str:
        return f"{self.error} {json.dumps(self.reply_parameters)}" if self.reply_parameters else self.error


@dataclasses.dataclass
class DBusCallError(_InternalError):
    """An error reply to a D-Bus method call (PID 1's systemd1, machined's machine1)."""

    name: str
    text: str = ""

    @override
    def __str__(self) -> str:
        return f"{self.name}: {self.text}" if self.text else self.name


ALL_ERRORS: tuple[type[VmspawnError], ...] = (
    InvalidSpec,
    NoSuchMachine,
    MachineExists,
    InvalidState,
    StartFailed,
    PermissionDenied,
    Timeout,
    NotConnected,
    NotSupported,
    ProtocolViolation,
    ConsoleBusy,
    NoSuchSnapshot,
    SnapshotIncompatible,
)


def to_camel(name: str) -> str:
    """snake_case → lowerCamelCase, the field convention of systemd's Varlink APIs."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def to_snake(name: str) -> str:
    """lowerCamelCase → snake_case (inverse of `to_camel` for our field names)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)
