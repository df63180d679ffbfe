# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU option strings (vmspawnd.qemu_opts) checked against a model of QEMU's own parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.qemu_opts import escape_qemu_value, format_qemu_opts

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
def test_model_splitter_matches_qemu_examples(
    params: str, firstname: str | None, expected: list[tuple[str, str]]
) -> None:
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


# --------------------------------------------------------------------------------------
# format_qemu_opts
# --------------------------------------------------------------------------------------


def test_format_examples() -> None:
    assert format_qemu_opts("virtio-rng-pci", [("rng", "rng0"), ("id", "rng-device0")]) == (
        "virtio-rng-pci,rng=rng0,id=rng-device0"
    )
    assert format_qemu_opts(None, [("if", "pflash"), ("file", "/a,b.fd")]) == "if=pflash,file=/a,,b.fd"
    assert format_qemu_opts("none", []) == "none"
    assert format_qemu_opts(None, [("type", "11"), ("value", "io.systemd.credential.binary:x=eQ==")]) == (
        "type=11,value=io.systemd.credential.binary:x=eQ=="
    )


def test_format_value_cannot_inject_options() -> None:
    s = format_qemu_opts("virtio-blk-pci", [("drive", "x,id=evil,bootindex=0"), ("serial", "s")])
    assert qemu_opts_split(s, "driver") == [
        ("driver", "virtio-blk-pci"),
        ("drive", "x,id=evil,bootindex=0"),
        ("serial", "s"),
    ]


@pytest.mark.parametrize(
    "driver",
    ["", "a,b", "a=b", "{\"driver\":\"x\"}", "-x", "help", "?", "a b", "caf\u00e9", "a\0"],
)
def test_format_refuses_bad_driver(driver: str) -> None:
    with pytest.raises(ValueError, match="driver"):
        format_qemu_opts(driver, [("k", "v")])


@pytest.mark.parametrize("key", ["", "a,b", "a=b", "help", "?", " k", "k\n", "_k"])
def test_format_refuses_bad_key(key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        format_qemu_opts("drv", [(key, "v")])


def test_format_refuses_nul_value_and_empty_result() -> None:
    with pytest.raises(ValueError, match="NUL"):
        format_qemu_opts("drv", [("k", "a\0b")])
    with pytest.raises(ValueError, match="driver or at least one"):
        format_qemu_opts(None, [])


def test_format_props_must_be_pairs() -> None:
    with pytest.raises(TypeError):
        format_qemu_opts("drv", [("k",)])  # type: ignore[list-item]


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True).filter(lambda n: n != "help")
# Arbitrary text without NUL, biased towards the characters that matter to the parser.
_values = st.one_of(
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=30),
    st.text(alphabet=",=\"' \\\n\t;:{}a\u00e9\U0001f600", max_size=30),
)


@given(driver=st.none() | _names, props=st.lists(st.tuples(_names, _values), max_size=6))
def test_format_roundtrips_through_qemu_parser(driver: str | None, props: list[tuple[str, str]]) -> None:
    if driver is None and not props:
        return
    s = format_qemu_opts(driver, props)
    expected = ([("driver", driver)] if driver is not None else []) + props
    assert qemu_opts_split(s, "driver" if driver is not None else None) == expected


@given(props=st.lists(st.tuples(_names, _values), min_size=1, max_size=6))
def test_format_without_driver_is_immune_to_an_implied_first_name(props: list[tuple[str, str]]) -> None:
    # -nic/-chardev/-object have an implied first name; a string without a driver must
    # still parse as exactly the given key=value pairs.
    assert qemu_opts_split(format_qemu_opts(None, props), "type") == props


@given(st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40))
def test_escaped_value_is_recovered_exactly(value: str) -> None:
    assert qemu_opts_split("k=" + escape_qemu_value(value)) == [("k", value)]
