# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU firmware-interop descriptors: finding, parsing and choosing them (docs/reference/systemd-vmspawn.md §3.3).

systemd-vmspawn picks UEFI firmware from the JSON descriptors defined by QEMU's
``docs/interop/firmware.json`` that distributions install in ``*/qemu/firmware``.  This
module reproduces vmspawn 257–260's behaviour:

* search ``$XDG_CONFIG_HOME/qemu/firmware`` (default ``~/.config/qemu/firmware``),
  ``/etc/qemu/firmware``, ``/usr/share/qemu/firmware`` with systemd's conf-files rules
  (:func:`list_descriptor_paths` is the pure core, :func:`find_descriptor_paths` the thin
  directory-reading wrapper — the only I/O in this module);
* parse each descriptor strictly, requiring every key vmspawn requires
  (:func:`parse_descriptor`; so ``memory``-mapped/stateless firmware without an
  ``nvram-template`` is never chosen, exactly as in vmspawn);
* take the first descriptor that passes the filters (:func:`select_firmware`).
"""

from __future__ import annotations

import enum
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FirmwareDescriptor",
    "EntryKind",
    "DESCRIPTOR_SUFFIX",
    "SYSTEM_DESCRIPTOR_DIRS",
    "descriptor_search_dirs",
    "list_descriptor_paths",
    "find_descriptor_paths",
    "parse_descriptor",
    "select_firmware",
]

DESCRIPTOR_SUFFIX = ".json"
#: The fixed, lower-priority search directories (after the per-user one).
SYSTEM_DESCRIPTOR_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")


@dataclass(frozen=True)
class FirmwareDescriptor:
    """The parts of a firmware descriptor that vmspawn reads.

    ``path`` is where the descriptor came from (for messages and ``--firmware=list``);
    the ``executable_*``/``nvram_template_*`` fields are ``mapping.executable`` and
    ``mapping.nvram-template``; ``architectures`` are the ``targets[].architecture``
    values in order.  ``raw`` keeps the parsed JSON (v261's ``--firmware=describe``
    prints it) and takes no part in comparisons.
    """

    path: str
    description: str
    interface_types: tuple[Any, ...]
    executable_path: str
    executable_format: str
    nvram_template_path: str
    nvram_template_format: str
    architectures: tuple[str, ...]
    features: tuple[str, ...]
    tags: tuple[Any, ...]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def supports_secure_boot(self) -> bool:
        """``secure-boot`` is among the features: decides SMM, the vars drive and the pflash global."""
        return "secure-boot" in self.features


class EntryKind(enum.Enum):
    """What a directory entry is, as far as systemd's conf-files logic cares.

    The classification follows symlinks (systemd chases them): a symlink to /dev/null (or
    any character device) and an empty regular file are *masks*; a non-empty regular file
    is a candidate; anything else (directory, socket, dangling symlink, unreadable) is
    ignored and — unlike a mask — does not hide same-named files in lower directories.
    """

    REGULAR = "regular"
    MASK = "mask"
    OTHER = "other"


def _is_hidden_or_backup(name: str) -> bool:
    """The relevant part of systemd's hidden_or_backup_file(): dot files are never read.

    (The backup suffixes it also filters — ``~``, ``.rpmnew``, ``.dpkg-old``, … — can never
    end in ``.json``, so they need no separate check here.)
    """
    return name.startswith(".")


def list_descriptor_paths(dirs_with_listings: Iterable[tuple[str, Mapping[str, EntryKind]]]) -> list[str]:
    """conf_files_list_strv(…, ".json", CONF_FILES_FILTER_MASKED|CONF_FILES_REGULAR, dirs) over given listings.

    ``dirs_with_listings`` is ``[(directory, {file_name: EntryKind}), …]`` in priority order
    (highest first); a directory that does not exist is simply absent or has an empty
    mapping.  Rules: only ``*.json`` names that are not dot files; the first directory
    providing a name wins; a mask hides the name in all lower directories; only regular
    files are returned; the result is sorted by file name (not by directory), which is
    what makes ``50-…`` win over ``60-…`` wherever they live.
    """
    chosen: dict[str, str] = {}
    masked: set[str] = set()
    for directory, entries in dirs_with_listings:
        for name, kind in entries.items():
            if "/" in name or not name.endswith(DESCRIPTOR_SUFFIX) or _is_hidden_or_backup(name):
                continue
            if name in chosen or name in masked:
                continue
            if kind is EntryKind.MASK:
                masked.add(name)
            elif kind is EntryKind.REGULAR:
                chosen[name] = directory.rstrip("/") + "/" + name if directory != "/" else "/" + name
    return [chosen[name] for name in sorted(chosen, key=lambda n: n.encode("utf-8", "surrogateescape"))]


def descriptor_search_dirs(xdg_config_home: str | None, home: str | None = None) -> list[str]:
    """The three search directories, highest priority first.

    ``$XDG_CONFIG_HOME`` counts only when set to an absolute path (the XDG spec says to
    ignore relative values); otherwise ``$HOME/.config`` is used.  Pure given ``home``;
    when ``home`` is None it is looked up with :func:`os.path.expanduser`.
    """
    if xdg_config_home and xdg_config_home.startswith("/"):
        config = xdg_config_home
    else:
        base = home if home is not None else os.path.expanduser("~")
        config = base.rstrip("/") + "/.config"
    return [config.rstrip("/") + "/qemu/firmware", *SYSTEM_DESCRIPTOR_DIRS]


def _classify(path: str) -> EntryKind:
    try:
        st = os.stat(path)  # follows symlinks, like systemd's chase
    except OSError:
        return EntryKind.OTHER
    if stat.S_ISCHR(st.st_mode):
        return EntryKind.MASK
    if stat.S_ISREG(st.st_mode):
        return EntryKind.MASK if st.st_size == 0 else EntryKind.REGULAR
    return EntryKind.OTHER


def _read_listing(directory: str) -> tuple[str, dict[str, EntryKind]] | None:
    try:
        resolved = os.path.realpath(directory, strict=True)
        with os.scandir(resolved) as it:
            names = [e.name for e in it]
    except OSError:
        return None  # missing or unreadable directories are skipped, as in systemd
    return resolved, {name: _classify(os.path.join(resolved, name)) for name in names}


def find_descriptor_paths(xdg_config_home: str | None, home: str | None = None) -> list[str]:
    """The ordered descriptor list (what ``--firmware=list`` prints); reads the directories.

    Directory paths are reported resolved (systemd chases the directory before listing,
    so a symlinked ``~/.config`` shows up under its target).
    """
    listings = []
    for directory in descriptor_search_dirs(xdg_config_home, home):
        listing = _read_listing(directory)
        if listing is not None:
            listings.append(listing)
    return list_descriptor_paths(listings)


_TYPE_NAMES: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}


def _require(obj: Mapping[str, Any], key: str, kind: type, where: str, path: str) -> Any:
    """A mandatory key of the given JSON type (sd_json_dispatch with SD_JSON_MANDATORY: null is not ok)."""
    if key not in obj:
        raise ValueError(f"Firmware descriptor {path}: missing mandatory key '{where}{key}'")
    value = obj[key]
    if not isinstance(value, kind):
        raise ValueError(f"Firmware descriptor {path}: '{where}{key}' must be {_TYPE_NAMES[kind]}")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _filename_and_format(mapping: Mapping[str, Any], key: str, path: str) -> tuple[str, str]:
    sub = _require(mapping, key, dict, "mapping.", path)
    return (
        _require(sub, "filename", str, f"mapping.{key}.", path),
        _require(sub, "format", str, f"mapping.{key}.", path),
    )


def parse_descriptor(path: str, data: bytes) -> FirmwareDescriptor:
    """Parse one descriptor with vmspawn's mandatory-key rules (load_firmware_data()).

    Mandatory, with these JSON types: ``description`` (string), ``interface-types``
    (array), ``mapping`` (object) with ``device`` (string), ``executable`` and
    ``nvram-template`` (objects with string ``filename`` and ``format``), ``targets``
    (array of objects with string ``architecture`` and array ``machines``), ``features``
    (array of strings), ``tags`` (array).  Unknown keys are tolerated (vmspawn 257+
    dispatches with "allow extensions").  Any violation raises ValueError naming the key
    and the expected type; vmspawn skips such files with a debug message.
    """
    try:
        doc = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, NaN/Infinity
        raise ValueError(f"Firmware descriptor {path}: not valid UTF-8 JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"Firmware descriptor {path}: top level must be a JSON object")

    description = _require(doc, "description", str, "", path)
    interface_types = _require(doc, "interface-types", list, "", path)
    mapping = _require(doc, "mapping", dict, "", path)
    _require(mapping, "device", str, "mapping.", path)
    exe_path, exe_format = _filename_and_format(mapping, "executable", path)
    nv_path, nv_format = _filename_and_format(mapping, "nvram-template", path)

    targets = _require(doc, "targets", list, "", path)
    architectures = []
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise ValueError(f"Firmware descriptor {path}: 'targets[{i}]' must be an object")
        architectures.append(_require(target, "architecture", str, f"targets[{i}].", path))
        _require(target, "machines", list, f"targets[{i}].", path)

    features = _require(doc, "features", list, "", path)
    if not all(isinstance(f, str) for f in features):
        raise ValueError(f"Firmware descriptor {path}: 'features' must be an array of strings")
    tags = _require(doc, "tags", list, "", path)

    return FirmwareDescriptor(
        path=path,
        description=description,
        interface_types=tuple(interface_types),
        executable_path=exe_path,
        executable_format=exe_format,
        nvram_template_path=nv_path,
        nvram_template_format=nv_format,
        architectures=tuple(architectures),
        features=tuple(features),
        tags=tuple(tags),
        raw=doc,
    )


def select_firmware(descriptors: Sequence[FirmwareDescriptor], arch: str, secure_boot: bool | None) -> FirmwareDescriptor:
    """The first acceptable descriptor, in the given (search-list) order — find_ovmf_config().

    Filters, in vmspawn's order: skip firmware with ``enrolled-keys`` (pre-enrolled
    Microsoft keys were known to break booting, PR #30944); skip firmware that does not
    list ``arch`` (the QEMU architecture name, e.g. ``x86_64``) among its targets; when
    ``secure_boot`` is not None, require ``secure-boot`` support to match it.  Raises
    LookupError("Failed to find OVMF config") when nothing qualifies.
    """
    for d in descriptors:
        if "enrolled-keys" in d.features:
            continue
        if arch not in d.architectures:
            continue
        if secure_boot is not None and secure_boot != d.supports_secure_boot:
            continue
        return d
    wanted = "" if secure_boot is None else f" with secure-boot={'yes' if secure_boot else 'no'}"
    raise LookupError(f"Failed to find OVMF config: no firmware descriptor for {arch}{wanted} without enrolled keys")
