# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU option strings (vmspawnd.qemu_opts) checked against a model of QEMU's own parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.qemu.opts import escape_qemu_value

# --------------------------------------------------------------------------------------
# An independent model of QEMU's QemuOpts parser (util/qemu-option.c: opts_do_parse(),
# get_opt_name_value(), get_opt_value()), written from QEMU's source, not from ours:
#
#   * a name runs up to the first '=' or ',' (strcspn(params, "=,")) and has no escapes;
#   * if that stops at '=', the value follows; if not, the token is either the implicitly
#     named first option (firstname, e.g. "driver" for -device) whose whole text up to the
#     next single comma is the value, or a flag ("foo" → on, "nofoo" → off);
#   * a value runs up to the next comma that is not doubled; ",," stands for ",";
#   * firstname only applies to the very first token.
# --------------------------------------------------------------------------------------


def _get_opt_value(params: str, p: int) -> tuple[str, int]:
    value = ""
    while True:
        offset = params.find(",", p)
        if offset < 0:
            offset = len(params)
        length = offset - p
        doubled = offset + 1 < len(params) and params[offset + 1] == ","
        if offset < len(params) and doubled:
            length += 1
        value += params[p : p + length]
        if offset >= len(params) or not doubled:
            return value, offset
        p = offset + 2


def qemu_opts_split(params: str, firstname: str | None = None) -> list[tuple[str, str]]:
    """Split a QemuOpts string the way QEMU does; returns (name, value) pairs in order."""
    out: list[tuple[str, str]] = []
    p = 0
    while p < len(params):
        n = p
        while n < len(params) and params[n] not in "=,":
            n += 1
        if n < len(params) and params[n] == "=":
            name = params[p:n]
            value, p = _get_opt_value(params, n + 1)
        elif firstname is not None:
            name = firstname
            value, p = _get_opt_value(params, p)
        else:
            name = params[p:n]
            p = n
            if name.startswith("no"):
                name, value = name[2:], "off"
            else:
                value = "on"
        out.append((name, value))
        firstname = None
        if p < len(params):
            assert params[p] == ","
            p += 1
    return out


@pytest.mark.parametrize(
    "params,firstname,expected",
    [
        ("a=b,,c,d=e", None, [("a", "b,c"), ("d", "e")]),
        ("virtio-blk-pci,drive=x", "driver", [("driver", "virtio-blk-pci"), ("drive", "x")]),
        ("foo,nobar", None, [("foo", "on"), ("bar", "off")]),
        ("a=,b=c", None, [("a", ""), ("b", "c")]),
        ("a=x,,", None, [("a", "x,")]),
        ("a=,,,,", None, [("a", ",,")]),
        ("a=b=c", None, [("a", "b=c")]),
        ("a=1,", None, [("a", "1")]),  # a trailing single comma ends the list
        ("x=1,y", "driver", [("x", "1"), ("y", "on")]),  # firstname only if the 1st token has no '='
    ],
)
def test_model_splitter_matches_qemu_examples(params: str, firstname: str | None, expected: list[tuple[str, str]]) -> None:
    assert qemu_opts_split(params, firstname) == expected


# --------------------------------------------------------------------------------------
# escape_qemu_value
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        ("", ""),
        ("plain", "plain"),
        ("a,b", "a,,b"),
        (",", ",,"),
        (",,", ",,,,"),
        ("/path/with,comma/and=equals", "/path/with,,comma/and=equals"),
        ("new\nline", "new\nline"),
        ("caf\u00e9", "caf\u00e9"),
        ("\udcff", "\udcff"),  # surrogate-escaped argv byte passes through
    ],
)
def test_escape_qemu_value(value: str, expected: str) -> None:
    assert escape_qemu_value(value) == expected


def test_escape_qemu_value_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        escape_qemu_value("a\0b")


def test_escape_qemu_value_refuses_unencodable() -> None:
    with pytest.raises(ValueError, match="encoded"):
        escape_qemu_value("\ud800")


@given(st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40))
def test_escaped_value_is_recovered_exactly(value: str) -> None:
    assert qemu_opts_split("k=" + escape_qemu_value(value)) == [("k", value)]
