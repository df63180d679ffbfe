# SPDX-License-Identifier: LGPL-2.1-or-later
"""Building QEMU ``driver,key=value,…`` option strings that cannot be subverted.

QEMU's QemuOpts syntax (util/qemu-option.c) splits option strings at commas; a literal
comma inside a value is written as ``,,``.  Names end at the first ``=`` or ``,`` and
have no escape at all, and only the value part is scanned for doubled commas.  So:

* values: doubling every comma (what vmspawn's ``escape_qemu_value()`` does) is enough
  to carry *any* text, including ``=``, quotes, spaces, newlines and non-ASCII — the only
  thing that cannot be carried is NUL, because argv strings are C strings;
* names (the implicit first value such as a device driver, and every key) cannot be
  escaped, so they are validated against a conservative character set instead.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["escape_qemu_value", "format_qemu_opts"]

# Names QEMU uses for drivers/backends and option keys: letters, digits, '-', '_', '.'.
# Starting with an alphanumeric also rules out QEMU's JSON syntax for -device/-object
# (an argument beginning with '{') and anything that looks like an option.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# QEMU treats an option named "help" or "?" (and a driver "help") as a help request.
_HELP_WORDS = frozenset({"help", "?"})


def _check_value(value: str, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{what} {value!r} contains a NUL character, which cannot be passed in argv")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} contains characters that cannot be encoded for argv") from None


def escape_qemu_value(value: str) -> str:
    """Escape ``value`` for use inside a QEMU option string by doubling every comma.

    Exactly vmspawn's escape_qemu_value(); used for user-controlled paths, socket paths and
    serials.  Refuses NUL (impossible in argv, and it would silently truncate the string).
    """
    _check_value(value, "QEMU option value")
    return value.replace(",", ",,")


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not _NAME.fullmatch(name) or name in _HELP_WORDS:
        raise ValueError(
            f"Invalid {what} {name!r}: QEMU option names cannot be escaped; expected letters, "
            "digits, '-', '_' or '.', starting with a letter or digit, and not 'help'"
        )


def format_qemu_opts(driver: str | None, props: Sequence[tuple[str, str]]) -> str:
    """Build ``driver,key=value,…`` (or ``key=value,…`` without a driver).

    Every value is escaped with :func:`escape_qemu_value`, so QEMU's parser recovers
    exactly the given keys and values — no value can end its option early or inject
    another one (e.g. ``id=``).  The driver, when given, is QEMU's implicitly named first
    option (``driver`` for -device, ``type`` for -nic/-netdev/-chardev/-object).  Driver
    and keys are validated rather than escaped (see module docstring); a value containing
    NUL raises ValueError.  Newlines are allowed: QemuOpts has no line structure and argv
    carries them fine (an INI ``-readconfig`` file would need a different encoder).
    """
    parts: list[str] = []
    if driver is not None:
        _check_name(driver, "QEMU driver name")
        parts.append(driver)
    for item in props:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError("props must be a sequence of (key, value) pairs")
        key, value = item
        _check_name(key, "QEMU option key")
        parts.append(f"{key}={escape_qemu_value(value)}")
    if not parts:
        raise ValueError("A QEMU option string needs a driver or at least one key=value pair")
    return ",".join(parts)
