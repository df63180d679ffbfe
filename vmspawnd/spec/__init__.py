# SPDX-License-Identifier: LGPL-2.1-or-later
"""The VM spec: what a client asks for, mirroring systemd-vmspawn's options.

Pure and shared with the CLI: the client parses vmspawn's command line into a `VmSpec`,
sends `VmSpec.to_json()`, and the daemon rebuilds it with `VmSpec.from_json()`, which
is also where a raw Varlink caller's mistakes become `InvalidSpec{field, reason}`.
Paths in a spec are absolute: the client resolves them against its own cwd, the daemon
never uses its cwd on a client's behalf.

Field names are snake_case here and lowerCamelCase on the wire (`errors.to_camel`).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any

from vmspawnd.errors import InvalidSpec, to_camel, to_snake
from vmspawnd.spec.parsers import hostname_cleanup, is_valid_hostname, parse_smp

DEFAULT_RAM = 2 * 1024**3


class ConsoleMode(enum.StrEnum):
    INTERACTIVE = "interactive"
    READ_ONLY = "read-only"
    NATIVE = "native"
    GUI = "gui"
    HEADLESS = "headless"


@dataclasses.dataclass(frozen=True)
class BindMount:
    """--bind / --bind-ro: a host directory shared into the guest by one virtiofsd."""

    source: str
    target: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class CredentialData:
    """--set-credential / --load-credential, read by the client: `data` is base64."""

    id: str
    data: str


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """One VM request, one field per systemd-vmspawn 259 option (defaults are its defaults).

    Tri-states are `bool | None` (None = auto). What the client read from its own
    environment travels here too: credential contents, $SYSTEMD_VMSPAWN_QEMU_EXTRA
    (`qemu_extra`, already split), $SYSTEMD_VMSPAWN_NETWORK_MAC (`network_mac`), $TERM.
    """

    name: str | None = None
    image: str | None = None
    directory: str | None = None
    linux: str | None = None
    initrds: list[str] = dataclasses.field(default_factory=list)
    cpus: str = "1"
    ram: int = DEFAULT_RAM
    kvm: bool | None = None
    vsock: bool | None = None
    vsock_cid: int | None = None
    tpm: bool | None = None
    tpm_state: str = "auto"  # "auto", "off" or an absolute path
    network_tap: bool = False
    network_user_mode: bool = False
    network_mac: str | None = None
    firmware: str | None = None  # path of a firmware descriptor
    secure_boot: bool | None = None
    discard_disk: bool = True
    grow_image: int | None = None
    smbios11: list[str] = dataclasses.field(default_factory=list)
    notify_ready: bool = True
    uuid: str | None = None
    slice: str | None = None
    properties: list[str] = dataclasses.field(default_factory=list)
    register: bool | None = None
    keep_unit: bool = False
    private_users: str | None = None  # "UIDBASE[:NUIDS]"
    binds: list[BindMount] = dataclasses.field(default_factory=list)
    extra_drives: list[str] = dataclasses.field(default_factory=list)
    bind_users: list[str] = dataclasses.field(default_factory=list)
    bind_user_shell: str | None = None  # boolean word or absolute path
    bind_user_groups: list[str] = dataclasses.field(default_factory=list)
    forward_journal: str | None = None
    pass_ssh_key: bool = True
    ssh_key_type: str = "ed25519"
    console: str = ConsoleMode.INTERACTIVE.value
    credentials: list[CredentialData] = dataclasses.field(default_factory=list)
    qemu_extra: list[str] = dataclasses.field(default_factory=list)
    term: str | None = None
    kernel_cmdline: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The wire form: camelCase keys, defaults left out so requests stay short."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != _default_of(f):
                out[to_camel(f.name)] = _jsonable(value)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> VmSpec:
        """Rebuild and validate a spec from the wire; every problem names its field."""
        if not isinstance(data, Mapping):
            raise InvalidSpec("spec", "must be an object")
        kwargs = _read_fields(cls, data, prefix="")
        spec = cls(**kwargs)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Checks that need no I/O; the daemon checks paths when it resolves them."""
        if self.name is not None:
            check_machine_name(self.name)
        for field in ("image", "linux"):
            _check_absolute(field, getattr(self, field))
        for index, path in enumerate(self.initrds):
            _check_absolute(f"initrds[{index}]", path)
        for index, path in enumerate(self.extra_drives):
            _check_absolute(f"extraDrives[{index}]", path)
        if self.initrds and not self.linux:
            raise InvalidSpec("initrds", "--initrd= requires --linux=")
        try:
            parse_smp(self.cpus)
        except ValueError as exc:
            raise InvalidSpec("cpus", str(exc)) from None
        if self.ram <= 0:
            raise InvalidSpec("ram", "must be a positive number of bytes")
        if self.console not in {m.value for m in ConsoleMode}:
            accepted = ", ".join(m.value for m in ConsoleMode)
            raise InvalidSpec("console", f"must be one of {accepted}")
        if self.image is None and self.linux is None and self.directory is None:
            raise InvalidSpec("image", "one of image, directory or linux is required")
        if self.image is not None and self.directory is not None:
            raise InvalidSpec("directory", "--directory= and --image= cannot be combined")
        for index, word in enumerate(self.kernel_cmdline):
            if "\n" in word or "\0" in word:
                raise InvalidSpec(f"kernelCmdline[{index}]", "must not contain newlines or NUL")
        validate_options(self)

    def machine_name(self) -> str:
        """The name vmspawn would use: -M, else the image file name without `.raw`."""
        if self.name:
            return self.name
        if self.directory and not self.image:
            import socket

            from vmspawnd.spec.parsers import default_machine_name

            try:
                return default_machine_name(None, self.directory, socket.gethostname())
            except ValueError as exc:
                raise InvalidSpec("name", str(exc)) from None
        if self.image:
            base = self.image.rstrip("/").rsplit("/", 1)[-1]
            base = base.removesuffix(".raw")
            cleaned = hostname_cleanup(base)
            check_machine_name(cleaned, field="name", hint="please use -M/--machine=")
            return cleaned
        raise InvalidSpec("name", "required when no image is given (use -M/--machine=)")


def check_machine_name(name: str, field: str = "name", hint: str = "") -> None:
    """Machine names are hostnames (systemd's hostname_is_valid without a trailing dot)."""
    if not is_valid_hostname(name):
        reason = (
            "must be a valid hostname: 1-64 characters of letters, digits, '-' and '.', not starting or ending with '-' or '.'"
        )
        raise InvalidSpec(field, f"{reason}{'; ' + hint if hint else ''}")


def _check_absolute(field: str, path: str | None) -> None:
    if path is not None and not path.startswith("/"):
        raise InvalidSpec(field, f"must be an absolute path, got {path!r}")


def _default_of(f: dataclasses.Field[object]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def _read_fields(cls: type, data: Mapping[str, object], prefix: str) -> dict[str, Any]:
    """camelCase JSON fields → checked snake_case keyword arguments; null means default."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}  # each value checked against its field's type (_check_type)
    for key, value in data.items():
        name = to_snake(key)
        if name not in names or to_camel(name) != key:
            raise InvalidSpec(f"{prefix}{key}", "unknown field")
        if value is not None:
            kwargs[name] = _check_type(f"{prefix}{key}", hints[name], value)
    return kwargs


def _jsonable(value: object) -> object:
    """Nested spec dataclasses → camelCase dicts for the wire."""
    if dataclasses.is_dataclass(value):
        return {to_camel(f.name): _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _check_type(field: str, hint: object, value: object) -> object:
    """Minimal runtime type check for JSON values against the dataclass hints."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_type(field, option, value)
            except InvalidSpec as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise InvalidSpec(field, "must be a list")
        return [_check_type(f"{field}[{i}]", args[0], v) for i, v in enumerate(value)]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise InvalidSpec(field, "must be an object")
        kwargs = _read_fields(hint, value, prefix=f"{field}.")
        names = {f.name: f for f in dataclasses.fields(hint)}
        missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise InvalidSpec(f"{field}.{to_camel(missing[0])}", "is required")
        return hint(**kwargs)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidSpec(field, "must be a boolean")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidSpec(field, "must be an integer")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise InvalidSpec(field, "must be a string")
        return value
    raise AssertionError(f"unhandled type {hint!r} for {field}")


# --- validation of the remaining options (shared by vmspawnctl and the daemon) -----------

SSH_KEY_TYPES = ("ed25519", "rsa", "ecdsa", "ecdsa-sk", "ed25519-sk")

# The scope properties --property= accepts: resource limits that apply to a VM's scope.
# Anything else is refused by name (vmspawn forwards any property to systemd; the daemon
# applies only what it implements, see docs/deviations.md).
SCOPE_PROPERTIES = frozenset(
    {
        "CPUQuota",
        "CPUWeight",
        "StartupCPUWeight",
        "AllowedCPUs",
        "AllowedMemoryNodes",
        "MemoryMin",
        "MemoryLow",
        "MemoryHigh",
        "MemoryMax",
        "MemorySwapMax",
        "TasksMax",
        "IOWeight",
        "StartupIOWeight",
        "DeviceAllow",
        "DevicePolicy",
        "ManagedOOMMemoryPressure",
    }
)


def check_property(text: str) -> None:
    """`NAME=VALUE` with NAME in SCOPE_PROPERTIES and VALUE in the form NAME takes."""
    name, sep, value = text.partition("=")
    accepted = ", ".join(sorted(SCOPE_PROPERTIES))
    if not sep or not name:
        raise InvalidSpec("properties", f"invalid property {text!r}: expected NAME=VALUE with NAME one of {accepted}")
    if name not in SCOPE_PROPERTIES:
        raise InvalidSpec("properties", f"property {name}= is not supported; supported: {accepted}")
    from vmspawnd.spec.parsers import parse_size

    def bad(forms: str) -> InvalidSpec:
        return InvalidSpec("properties", f"invalid value for {name}=: {value!r}; expected {forms}")

    if name == "CPUQuota":
        if not (value.endswith("%") and value[:-1].isdigit() and int(value[:-1]) > 0):
            raise bad("a positive percentage such as 50% or 200%")
    elif name in ("CPUWeight", "StartupCPUWeight", "IOWeight", "StartupIOWeight"):
        if not (
            value == "" or (value.isdigit() and 1 <= int(value) <= 10000) or (name.endswith("CPUWeight") and value == "idle")
        ):
            raise bad("an integer 1…10000" + (" or idle" if "CPU" in name else ""))
    elif name.startswith("Memory"):
        if value == "infinity" or (value.endswith("%") and value[:-1].isdigit() and int(value[:-1]) <= 100):
            return
        try:
            parse_size(value)
        except ValueError:
            raise bad("a size with an optional K, M, G, T suffix, a percentage, or infinity") from None
    elif name == "TasksMax":
        if not (value == "infinity" or value.isdigit() or (value.endswith("%") and value[:-1].isdigit())):
            raise bad("a number, a percentage or infinity")
    elif name == "DevicePolicy":
        if value not in ("auto", "closed", "strict"):
            raise bad("auto, closed or strict")
    elif name == "DeviceAllow":
        path, _, perms = value.partition(" ")
        if not path or not (path.startswith(("/dev/", "char-", "block-"))) or any(c not in "rwm" for c in perms):
            raise bad("a device node (/dev/…, char-…, block-…) followed by r, w, m")
    elif name in ("AllowedCPUs", "AllowedMemoryNodes"):
        if not value or any(c not in "0123456789-, " for c in value):
            raise bad("a list of CPU or node indices and ranges, e.g. 0-3,6")
    elif name == "ManagedOOMMemoryPressure" and value not in ("auto", "kill"):
        raise bad("auto or kill")


def is_valid_user_name(name: str) -> bool:
    """systemd valid_user_group_name() (relaxed): letters, digits, _ - . and not leading digit/-."""
    if not name or len(name) > 256 or name in (".", ".."):
        return False
    if name[0].isdigit() or name[0] == "-":
        return False
    return all(c.isascii() and (c.isalnum() or c in "_-.") for c in name)


def validate_options(spec: VmSpec) -> None:
    """Checks of the option fields beyond paths and names, each naming its field."""
    import base64
    import binascii

    from vmspawnd.spec.parsers import credential_name_is_valid, parse_ether_addr, parse_private_users

    _check_absolute("directory", spec.directory)
    _check_absolute("forwardJournal", spec.forward_journal)
    if spec.vsock_cid is not None and not 3 <= spec.vsock_cid <= 0xFFFFFFFE:
        raise InvalidSpec("vsockCid", "must be a regular CID (3…4294967294)")
    if spec.tpm_state not in ("auto", "off"):
        _check_absolute("tpmState", spec.tpm_state)
    if spec.network_tap and spec.network_user_mode:
        raise InvalidSpec("networkTap", "--network-tap and --network-user-mode cannot be combined")
    if spec.network_mac is not None:
        try:
            parse_ether_addr(spec.network_mac)
        except ValueError as exc:
            raise InvalidSpec("networkMac", str(exc)) from None
    if spec.firmware is not None:
        _check_absolute("firmware", spec.firmware)
    if spec.grow_image is not None and spec.grow_image <= 0:
        raise InvalidSpec("growImage", "must be a positive number of bytes")
    if spec.grow_image is not None and not spec.image:
        raise InvalidSpec("growImage", "--grow-image= requires --image=")
    for index, text in enumerate(spec.smbios11):
        if "\0" in text:
            raise InvalidSpec(f"smbios11[{index}]", "must not contain NUL")
    if spec.slice is not None and (not spec.slice.endswith(".slice") or "/" in spec.slice):
        raise InvalidSpec("slice", "must be a slice unit name (NAME.slice)")
    for prop in spec.properties:
        check_property(prop)
    if spec.private_users is not None:
        try:
            parse_private_users(spec.private_users)
        except ValueError as exc:
            raise InvalidSpec("privateUsers", str(exc)) from None
    for index, bind in enumerate(spec.binds):
        _check_absolute(f"binds[{index}].source", bind.source)
        _check_absolute(f"binds[{index}].target", bind.target)
    for index, user in enumerate(spec.bind_users):
        if not is_valid_user_name(user):
            raise InvalidSpec(f"bindUsers[{index}]", "must be a valid user name")
    for index, group in enumerate(spec.bind_user_groups):
        if not is_valid_user_name(group):
            raise InvalidSpec(f"bindUserGroups[{index}]", "must be a valid group name")
    if spec.bind_user_shell is not None and not spec.bind_users:
        raise InvalidSpec("bindUserShell", "--bind-user-shell= requires --bind-user=")
    if spec.bind_user_groups and not spec.bind_users:
        raise InvalidSpec("bindUserGroups", "--bind-user-group= requires --bind-user=")
    if spec.bind_user_shell is not None and spec.bind_user_shell not in ("yes", "no"):
        _check_absolute("bindUserShell", spec.bind_user_shell)
    if spec.ssh_key_type not in SSH_KEY_TYPES:
        raise InvalidSpec("sshKeyType", f"must be one of {', '.join(SSH_KEY_TYPES)}")
    seen: set[str] = set()
    for index, cred in enumerate(spec.credentials):
        if not credential_name_is_valid(cred.id):
            raise InvalidSpec(f"credentials[{index}].id", "not a valid credential name")
        if cred.id in seen:
            raise InvalidSpec(f"credentials[{index}].id", f"Duplicate credential '{cred.id}', refusing")
        seen.add(cred.id)
        try:
            base64.b64decode(cred.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidSpec(f"credentials[{index}].data", "must be base64") from None
