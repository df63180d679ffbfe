# SPDX-License-Identifier: LGPL-2.1-or-later
"""Render vmspawnd/spec/wire.py, the io.vmspawnd.Manager types as they travel, from the pure
dataclasses they mirror.

The fields are defined once, in `VmSpec`, `ProcessRecord` and `MachineRecord` (snake_case);
the wire module is their camelCase twin, written out as plain source so that mypy, readers
and the CLI see real classes instead of ones built by reflection at import time.
tests/unit/test_wire.py renders it into memory and compares it with the committed file
(VMSPAWND_REGENERATE=1 rewrites the file; review the diff, then regenerate the IDL the same
way). `python -m tests.wire_codegen` prints it.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Iterator, Mapping

from vmspawnd.errors import to_camel
from vmspawnd.model import MachineRecord, MachineState, ProcessRecord, SnapshotRecord
from vmspawnd.spec import BindMount, CredentialData, VmSpec


# --- the shapes a wire field can have --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scalar:
    python: str  # str, int, bool, float


@dataclasses.dataclass(frozen=True)
class Ref:
    name: str  # another wire type of this module


@dataclasses.dataclass(frozen=True)
class Choice:
    alias: str  # a typing.Literal alias of this module (an IDL enum)


@dataclasses.dataclass(frozen=True)
class AnyJson:
    pass  # the IDL's `object`


@dataclasses.dataclass(frozen=True)
class ListOf:
    item: Shape


@dataclasses.dataclass(frozen=True)
class MapOf:
    value: Shape  # keys are strings


@dataclasses.dataclass(frozen=True)
class Nullable:
    inner: Shape  # the IDL's `?`: may be null or absent


Shape = Scalar | Ref | Choice | AnyJson | ListOf | MapOf | Nullable


@dataclasses.dataclass(frozen=True)
class WireField:
    name: str  # camelCase, as on the wire
    shape: Shape


@dataclasses.dataclass(frozen=True)
class WireType:
    name: str  # the IDL's type name
    doc: str
    fields: tuple[WireField, ...]


# --- what the pure types become -------------------------------------------------------------------
# Pure dataclass → its wire type's name; enum → the Literal alias that stands for it.
WIRE_NAMES: dict[type, str] = {
    BindMount: "BindMount",
    CredentialData: "CredentialData",
    VmSpec: "VmSpec",
    ProcessRecord: "Process",
    MachineRecord: "Machine",
    SnapshotRecord: "Snapshot",
}
CHOICES: dict[type[enum.Enum], str] = {MachineState: "MachineState"}


def shape_of(hint: object) -> Shape:
    """The wire shape of a field's type hint (nested pure dataclasses → their wire twins)."""
    if hint in (str, int, bool, float):
        assert isinstance(hint, type)
        return Scalar(hint.__name__)
    if isinstance(hint, type) and hint in WIRE_NAMES:
        return Ref(WIRE_NAMES[hint])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return Choice(CHOICES[hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (a for a in args if a is not type(None))
        return Nullable(shape_of(inner))
    if origin is list:
        return ListOf(shape_of(args[0]))
    if origin is dict and args[0] is str:
        return MapOf(AnyJson() if args[1] in (object, typing.Any) else shape_of(args[1]))
    raise AssertionError(f"no wire shape for {hint!r}")


def mirror(source: type, *, doc: str, all_optional: bool = False, shapes: Mapping[str, Shape] | None = None) -> WireType:
    """The wire twin of a pure dataclass: camelCase names, the same types, or `shapes` where
    the pure side holds something else (MachineRecord keeps its spec as JSON)."""
    hints = typing.get_type_hints(source)
    fields = []
    for f in dataclasses.fields(source):
        shape = (shapes or {}).get(f.name) or shape_of(hints[f.name])
        if all_optional and not isinstance(shape, Nullable):
            shape = Nullable(shape)
        fields.append(WireField(to_camel(f.name), shape))
    return WireType(WIRE_NAMES[source], doc, tuple(fields))


def wire_types() -> tuple[WireType, ...]:
    """Every type io.vmspawnd.Manager declares, each after the ones it refers to."""
    return (
        mirror(BindMount, doc="--bind / --bind-ro (vmspawnd.spec.BindMount)."),
        mirror(CredentialData, doc="--set-credential / --load-credential, data in base64 (vmspawnd.spec.CredentialData)."),
        mirror(
            VmSpec,
            all_optional=True,
            doc="A VM request (vmspawnd.spec.VmSpec); an absent or null field means vmspawn's default.",
        ),
        mirror(ProcessRecord, doc="A process, found again by pid, start time and boot (vmspawnd.model.ProcessRecord)."),
        mirror(
            MachineRecord,
            shapes={"spec": Ref("VmSpec")},
            doc="One VM as Describe reports it (vmspawnd.model.MachineRecord.to_json()).",
        ),
        mirror(
            SnapshotRecord,
            shapes={"spec": Ref("VmSpec")},
            doc="One snapshot bundle (vmspawnd.model.SnapshotRecord.to_json()).",
        ),
        WireType(
            "Event",
            "One event: a VM's state change, a QMP event of its QEMU, or a notice to the subscriber.",
            (
                WireField("machine", Nullable(Scalar("str"))),
                WireField("event", Scalar("str")),
                WireField("data", MapOf(AnyJson())),
            ),
        ),
    )


# --- rendering -------------------------------------------------------------------------------------
def annotation(shape: Shape, *, json: bool) -> str:
    """The Python type of a shape: wire dataclasses, or with `json` their TypedDict twins."""
    match shape:
        case Scalar(python):
            return python
        case Ref(name):
            return f"{name}Json" if json else name
        case Choice(alias):
            return alias
        case AnyJson():
            return "typing.Any"
        case ListOf(item):
            return f"list[{annotation(item, json=json)}]"
        case MapOf(value):
            return f"dict[str, {annotation(value, json=json)}]"
        case Nullable(inner):
            return f"{annotation(inner, json=json)} | None"
    raise AssertionError(shape)


def _dataclass(wire: WireType) -> Iterator[str]:
    yield "@dataclasses.dataclass(frozen=True, kw_only=True)"
    yield f"class {wire.name}:"
    yield f'    """{wire.doc}"""'
    yield ""
    for f in wire.fields:
        default = " = None" if isinstance(f.shape, Nullable) else ""
        yield f"    {f.name}: {annotation(f.shape, json=False)}{default}"


def _typeddict(wire: WireType) -> Iterator[str]:
    yield f"class {wire.name}Json(typing.TypedDict):"
    yield f'    """{wire.name} as JSON."""'
    yield ""
    for f in wire.fields:
        text = annotation(f.shape, json=True)
        yield f"    {f.name}: typing.NotRequired[{text}]" if isinstance(f.shape, Nullable) else f"    {f.name}: {text}"


HEADER = '''\
# SPDX-License-Identifier: LGPL-2.1-or-later
# Generated by tests/wire_codegen.py from vmspawnd.spec.VmSpec and vmspawnd.model's records: do
# not edit. After changing those: VMSPAWND_REGENERATE=1 pytest tests/unit/test_wire.py
# tests/unit/test_interfaces.py, and review both diffs.
"""The types of io.vmspawnd.Manager as they travel: camelCase fields, one class per IDL type.

The dataclasses are what the daemon declares (asyncvarlink renders them as the IDL's `type`
lines and builds them from requests). The `...Json` TypedDicts are the same shapes as the
decoded JSON, for readers of replies that keep the JSON as it came (vmspawnctl; it imports
them for type checking only). No `from __future__ import annotations`: asyncvarlink reads
these annotations at run time.
"""

import dataclasses
import typing
'''


def render_wire_module() -> str:
    """The source of vmspawnd/spec/wire.py."""
    types_ = wire_types()
    lines = [HEADER.rstrip("\n")]  # one blank line after the imports, as isort has it
    for enum_type, alias in CHOICES.items():
        values = ", ".join(f'"{member.value}"' for member in enum_type)
        lines += ["", f"{alias} = typing.Literal[{values}]", ""]
    for wire in types_:
        lines += ["", *_dataclass(wire), ""]
    for wire in types_:
        lines += ["", *_typeddict(wire), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render_wire_module(), end="")
