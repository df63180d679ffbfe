# SPDX-License-Identifier: LGPL-2.1-or-later
"""Escaping values for QEMU ``driver,key=value,…`` option strings so they cannot be subverted.

QEMU's QemuOpts syntax (util/qemu-option.c) splits option strings at commas; a literal
comma inside a value is written as ``,,``.  Names end at the first ``=`` or ``,`` and
have no escape at all, and only the value part is scanned for doubled commas.  So:

* values: doubling every comma (what vmspawn's ``escape_qemu_value()`` does) is enough
  to carry *any* text, including ``=``, quotes, spaces, newlines and non-ASCII — the only
  thing that cannot be carried is NUL, because argv strings are C strings;
* names (the implicit first value such as a device driver, and every key) cannot be
  escaped: the argv builder (qemu_command.py) only ever writes constant ones.

Pure: no I/O.
"""

from __future__ import annotations

__all__ = ["escape_qemu_value"]


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
