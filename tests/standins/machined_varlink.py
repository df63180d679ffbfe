# SPDX-License-Identifier: LGPL-2.1-or-later
"""A stand-in for systemd-machined's `io.systemd.Machine` Varlink interface (Register,
Unregister), served with asyncvarlink and recording every call.

Field names follow systemd's IDL (src/shared/varlink-io.systemd.Machine.c) verbatim. The
`legacy` variant lacks `controlAddress` and, like systemd < 261, refuses it with
`org.varlink.service.InvalidParameter` — asyncvarlink's own validation does exactly that.
No `from __future__ import annotations`: asyncvarlink reads real annotations.
"""

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncvarlink import (
    TypedVarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    create_unix_server,
    varlinkmethod,
)
from asyncvarlink.conversion import ObjectVarlinkType
from asyncvarlink.interface import varlinksignature
from asyncvarlink.util import VarlinkUnixServer


@dataclasses.dataclass
class ProcessId:
    pid: int
    pidfdId: int | None = None
    bootId: int | None = None


class MachineExists(TypedVarlinkErrorReply, interface="io.systemd.Machine"):
    class Parameters:
        pass


class NoSuchMachine(TypedVarlinkErrorReply, interface="io.systemd.Machine"):
    class Parameters:
        pass


_REGISTER_FIELDS: list[tuple[str, object]] = [
    ("name", str),
    ("id", str | None),
    ("service", str | None),
    ("klass", str),  # "class" on the wire; not a Python identifier
    ("leader", int | None),
    ("leaderProcessId", ProcessId | None),
    ("rootDirectory", str | None),
    ("ifIndices", list[int] | None),
    ("vSockCid", int | None),
    ("sshAddress", str | None),
    ("sshPrivateKeyPath", str | None),
    ("allowInteractiveAuthentication", bool | None),
    ("allocateUnit", bool | None),
    ("controlAddress", str | None),
]


def _register_method(with_control_address: bool) -> Callable[..., object]:
    """Build Register with a wire field called `class`, which Python cannot spell."""
    fields = [f for f in _REGISTER_FIELDS if with_control_address or f[0] != "controlAddress"]

    # Any: the keyword arguments are decoded JSON, checked by asyncvarlink against `fields`.
    def Register(self: "_MachineBase", **params: Any) -> None:
        params = {("class" if k == "klass" else k): v for k, v in params.items() if v is not None}
        if isinstance(params.get("leaderProcessId"), ProcessId):
            params["leaderProcessId"] = {k: v for k, v in dataclasses.asdict(params["leaderProcessId"]).items() if v is not None}
        self.calls.append(("Register", params))
        if params["name"] in self.machines:
            raise MachineExists()
        self.machines[params["name"]] = params

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, annotation in fields:
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
    # inspect.signature (which asyncvarlink reads) honours __signature__; typeshed does not declare it.
    Register.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    method = varlinkmethod(Register)
    signature = varlinksignature(method)
    assert signature is not None
    old = signature.parameter_type
    typemap = {("class" if k == "klass" else k): v for k, v in old._typemap.items()}
    populate = {("class" if k == "klass" else k) for k in old._populatenone}
    signature.parameter_type = ObjectVarlinkType(typemap, populatenone=populate)
    return method


class _MachineBase(VarlinkInterface, name="io.systemd.Machine"):
    def __init__(self) -> None:
        # Any: the recorded parameters are decoded JSON, in systemd's IDL's shapes.
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.machines: dict[str, dict[str, Any]] = {}

    @varlinkmethod
    def Unregister(self, name: str) -> None:
        self.calls.append(("Unregister", {"name": name}))
        if self.machines.pop(name, None) is None:
            raise NoSuchMachine()


class Machine261(_MachineBase):
    """machined of systemd 261+: knows controlAddress."""

    Register = _register_method(True)


class Machine259(_MachineBase):
    """machined of systemd ≤ 260: no controlAddress."""

    Register = _register_method(False)


async def serve(path: Path, legacy: bool = False) -> tuple[_MachineBase, VarlinkUnixServer]:
    interface: _MachineBase = Machine259() if legacy else Machine261()
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(interface)
    server = await create_unix_server(registry.protocol_factory, str(path))
    return interface, server
