# SPDX-License-Identifier: LGPL-2.1-or-later
"""systemd parsing rules (vmspawnd.parsers).

Two layers: example tables and properties written from systemd's source, and — where
the host has systemd's own ``libsystemd-shared-252.so`` — differential tests that feed
random inputs to both our implementation and systemd's C functions via ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmspawnd.spec import parsers as P
from vmspawnd.spec.parsers import (
    c_unescape,
    credential_name_is_valid,
    credential_source_kind,
    default_machine_name,
    extract_first_word,
    hostname_cleanup,
    is_valid_hostname,
    mangle_unit_name,
    parse_background,
    parse_bind,
    parse_boolean,
    parse_credential_id,
    parse_ether_addr,
    parse_private_users,
    parse_set_credential,
    parse_size,
    parse_tristate,
    parse_uuid,
    parse_vsock_cid,
    path_simplify,
    split_load_credential,
    split_qemu_extra,
)

KiB, MiB, GiB, TiB, PiB, EiB = (1024**i for i in range(1, 7))
U64 = 2**64 - 1


# --------------------------------------------------------------------------------------
# parse_size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0", 0),
        ("1", 1),
        ("512", 512),
        ("1B", 1),
        ("2G", 2147483648),
        ("1.5K", 1536),
        ("1.5G", 3 * GiB // 2),
        ("0.1K", 102),  # double arithmetic, truncated like the C cast
        ("10.M", 10 * MiB),  # "10." is fine
        ("1.0K", 1024),
        ("1.5", 1),  # fraction of bytes truncates
        ("3E", 3 * EiB),
        ("15E", 15 * EiB),
        ("1P", PiB),
        ("1T", TiB),
        (" 5", 5),  # leading whitespace skipped
        ("\t\n5M", 5 * MiB),
        ("+5", 5),  # strtoull() accepts a plus sign
        ("5 G", 5 * GiB),  # whitespace between number and suffix
        ("1G 512M", GiB + 512 * MiB),  # several components, decreasing units
        ("1G512M", GiB + 512 * MiB),
        ("1G2", GiB + 2),
        ("1K1B", 1025),
        ("007", 7),  # decimal, never octal
        ("18446744073709551615", U64),
        ("18446744073709551615.5", U64),  # the C code's unsigned wrap of l + 1 keeps this
    ],
)
def test_parse_size_valid(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "12Q",
        "1k",  # suffixes are upper case only
        "1g",
        "1KiB",
        "1KB",  # B after K is a second component without a number
        "5G ",  # trailing whitespace is refused
        "-1",
        " -1",
        "-0",
        ".5",
        "G",
        "0x10",
        "2M1G",  # units must decrease
        "1G1G",
        "1 2",
        "16E",  # overflow
        "18446744073709551616",
        "99999999999999999999999",
        "1.99999999999999999999999K",  # fraction digits overflow strtoull
        "1,5K",
        "1.5.K",
    ],
)
def test_parse_size_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_size_message_lists_accepted_forms() -> None:
    with pytest.raises(ValueError) as e:
        parse_size("12Q")
    msg = str(e.value)
    assert "'12Q'" in msg and "K, M, G" in msg and "1024" in msg


@given(st.integers(min_value=0, max_value=U64), st.sampled_from(["", "B", "K", "M", "G", "T", "P", "E"]))
def test_parse_size_integer_with_suffix(n: int, suffix: str) -> None:
    factor = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": PiB, "E": EiB}[suffix]
    text = f"{n}{suffix}"
    if n * factor <= U64:
        assert parse_size(text) == n * factor
    else:
        with pytest.raises(ValueError):
            parse_size(text)


# --------------------------------------------------------------------------------------
# booleans
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "yes", "y", "true", "t", "on", "YES", "True", "On", "Y", "T"])
def test_parse_boolean_true(text: str) -> None:
    assert parse_boolean(text) is True


@pytest.mark.parametrize("text", ["0", "no", "n", "false", "f", "off", "NO", "False", "OFF", "N", "F"])
def test_parse_boolean_false(text: str) -> None:
    assert parse_boolean(text) is False


@pytest.mark.parametrize("text", ["", "2", "yess", " yes", "yes ", "enable", "auto", "ye", "\u0130", "nо"])
def test_parse_boolean_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="yes"):
        parse_boolean(text)


def test_parse_tristate() -> None:
    assert parse_tristate("auto") is None
    assert parse_tristate("") is None  # parse_tristate_full(): empty is the third state
    assert parse_tristate("yes") is True
    assert parse_tristate("0") is False
    for bad in ("AUTO", "maybe", " auto"):
        with pytest.raises(ValueError, match="auto"):
            parse_tristate(bad)


# --------------------------------------------------------------------------------------
# c_unescape
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", b""),
        ("plain", b"plain"),
        (r"\a\b\f\n\r\t\v", b"\a\b\f\n\r\t\v"),
        (r"\\ \" \' \s", b"\\ \" '  "),  # the last space comes from \s
        (r"\x41\x7a", b"Az"),
        (r"\x00", b"\x00"),  # NUL accepted (UNESCAPE_ACCEPT_NUL)
        (r"\000\001\377", b"\x00\x01\xff"),
        (r"\xff\xFE", b"\xff\xfe"),  # raw bytes, not UTF-8
        (r"\u00e9", "\u00e9".encode()),
        (r"\u0000", b"\x00"),
        (r"\uFFFE", b"\xef\xbf\xbe"),  # noncharacters are fine with \u
        (r"\U0001F600", "\U0001f600".encode()),
        (r"\U00000041", b"A"),
        ("caf\u00e9", "caf\u00e9".encode()),  # literal non-ASCII copied as UTF-8
        ("a\udcffb", b"a\xffb"),  # surrogate-escaped argv bytes round-trip
        (r"a\x2cb", b"a,b"),
    ],
)
def test_c_unescape_valid(text: str, expected: bytes) -> None:
    assert c_unescape(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "\\",  # trailing backslash
        "abc\\",
        r"\q",
        r"\ ",
        r"\x4",
        r"\xg0",
        r"\400",  # > 255
        r"\08",
        r"\7",
        r"\u12",
        r"\ud800",  # UTF-16 surrogate
        r"\U00110000",  # beyond Unicode
        r"\U0000FFFE",  # \U uses unichar_is_valid(): noncharacters refused
        r"\U0000FDD0",
        r"\U0000D800",
        r"\U",
        "\ud800",  # a lone surrogate that is not a surrogate escape
    ],
)
def test_c_unescape_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        c_unescape(text)


def test_c_unescape_message_names_accepted_escapes() -> None:
    with pytest.raises(ValueError, match=r"\\xNN"):
        c_unescape(r"\q")


@given(st.binary(max_size=64))
def test_c_unescape_hex_escapes_roundtrip_any_bytes(data: bytes) -> None:
    assert c_unescape("".join(f"\\x{b:02x}" for b in data)) == data
    assert c_unescape("".join(f"\\{b:03o}" for b in data)) == data


@given(st.text(st.characters(blacklist_characters="\\", blacklist_categories=["Cs"]), max_size=40))
def test_c_unescape_without_backslash_is_utf8(text: str) -> None:
    assert c_unescape(text) == text.encode("utf-8")


# --------------------------------------------------------------------------------------
# extract_first_word / split_qemu_extra
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a:b", ("a", "b")),
        ("a", ("a", None)),
        ("", ("", None)),
        (":b", ("", "b")),
        ("a:", ("a", "")),
        ("a::b", ("a", ":b")),  # separators are not coalesced
        (r"a\:b:c", ("a:b", "c")),  # escaped separator
        (r"a\\:b", ("a\\", "b")),  # escaped backslash
        (r"a\nb:c", ("anb", "c")),  # no C unescaping: backslash just quotes
        ('"a:b":c', ('"a', 'b":c')),  # no quote handling
        (r"a:b\:c", ("a", r"b\:c")),  # the rest is verbatim
    ],
)
def test_extract_first_word(text: str, expected: tuple[str, str | None]) -> None:
    assert extract_first_word(text, ":") == expected


def test_extract_first_word_trailing_backslash() -> None:
    with pytest.raises(ValueError, match="backslash"):
        extract_first_word("abc\\", ":")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", []),
        ("   ", []),
        ("-serial stdio", ["-serial", "stdio"]),
        ("  a\t\tb\n c  ", ["a", "b", "c"]),
        ('-append "console=ttyS0 quiet"', ["-append", "console=ttyS0 quiet"]),
        ("-append 'a b'", ["-append", "a b"]),
        ('a"b c"d', ["ab cd"]),
        ("''", [""]),
        ('"" x', ["", "x"]),
        (r"a\sb", ["a b"]),  # \s is the escape for a space
        (r"\x41", ["A"]),
        (r"'\n'", ["\n"]),  # escapes are decoded inside single quotes too
        (r'"a\"b"', ['a"b']),
        (r"\xff", ["\udcff"]),  # raw byte kept as a surrogate escape for argv
        ("caf\u00e9", ["caf\u00e9"]),
    ],
)
def test_split_qemu_extra(text: str, expected: list[str]) -> None:
    assert split_qemu_extra(text) == expected


@pytest.mark.parametrize("text", ['"unbalanced', "'x", "a\\", r"a\ b", r"\q", r"\x00", r"\u0000"])
def test_split_qemu_extra_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="SYSTEMD_VMSPAWN_QEMU_EXTRA"):
        split_qemu_extra(text)


def _quote_for_extra(word: str) -> str:
    """Quote a word for $SYSTEMD_VMSPAWN_QEMU_EXTRA: double quotes, escape \\ and "."""
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


_argv_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=12)


@given(st.lists(_argv_text, max_size=6))
def test_split_qemu_extra_roundtrips_quoted_words(words: list[str]) -> None:
    assert split_qemu_extra(" ".join(_quote_for_extra(w) for w in words)) == words


# --------------------------------------------------------------------------------------
# --bind
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("/srv/data", ("/srv/data", "/srv/data")),
        ("/srv/data:/mnt", ("/srv/data", "/mnt")),
        ("data:/mnt", ("/home/u/data", "/mnt")),  # relative source against cwd
        ("./data/:/mnt", ("/home/u/data", "/mnt")),  # normalized
        ("/srv//a/./b/:/mnt", ("/srv/a/b", "/mnt")),
        ("../x:/mnt", ("/home/u/../x", "/mnt")),  # '..' kept (symlink-safe)
        (r"/a\:b:/mnt", ("/a:b", "/mnt")),  # escaped colon in the source
        (r"/a\:b", ("/a:b", "/a:b")),  # default target is the unescaped source argument
        ("/src:/dst:with:colons", ("/src", "/dst:with:colons")),  # target verbatim
        (r"/src:/d\:x", ("/src", r"/d\:x")),  # escapes in the target are not processed
    ],
)
def test_parse_bind(text: str, expected: tuple[str, str]) -> None:
    assert parse_bind(text, "/home/u") == expected


def test_parse_bind_cwd_root() -> None:
    assert parse_bind("x:/y", "/") == ("/x", "/y")


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "empty"),
        (":/mnt", "empty"),
        ("data", "not an absolute path"),  # relative source, default target = "data"
        ("/src:", "not an absolute path"),
        ("/src:relative", "not an absolute path"),
        ("/src\\", "backslash"),
    ],
)
def test_parse_bind_invalid(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_bind(text, "/home/u")


def test_parse_bind_requires_absolute_cwd() -> None:
    with pytest.raises(ValueError, match="absolute"):
        parse_bind("x:/y", "relative")


@pytest.mark.parametrize(
    "path,expected",
    [("/", "/"), ("//", "/"), ("/a//b/", "/a/b"), ("/a/./b/.", "/a/b"), ("a/../b", "a/../b"), ("./", "."), ("", "")],
)
def test_path_simplify(path: str, expected: str) -> None:
    assert path_simplify(path) == expected


# --------------------------------------------------------------------------------------
# credentials
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "foo.bar", "with space", "x" * 255, "~!@#$%^&*()", "..."])
def test_credential_name_valid(name: str) -> None:
    assert credential_name_is_valid(name)
    assert parse_credential_id(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a:b", "x" * 256, "tab\t", "del\x7f", "caf\u00e9", "nl\n"])
def test_credential_name_invalid(name: str) -> None:
    assert not credential_name_is_valid(name)
    with pytest.raises(ValueError, match="Credential name is not valid"):
        parse_credential_id(name)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("foo:bar", ("foo", b"bar")),
        ("foo:", ("foo", b"")),
        ("foo:a:b", ("foo", b"a:b")),
        (r"foo:line\nnext", ("foo", b"line\nnext")),
        (r"foo:\x00\x01", ("foo", b"\x00\x01")),  # binary, NUL allowed
        (r"foo:\000", ("foo", b"\x00")),
        ("foo:caf\u00e9", ("foo", "caf\u00e9".encode())),
    ],
)
def test_parse_set_credential(text: str, expected: tuple[str, bytes]) -> None:
    assert parse_set_credential(text) == expected


@pytest.mark.parametrize(
    "text,match",
    [
        ("foo", "Missing value"),
        ("", "Missing value"),
        (":value", "not valid"),
        (r"a\:b:value", "not valid"),  # \: unescapes to ':' which credential names forbid
        ("../x:v", "not valid"),
        (r"foo:\q", "escape"),
        ("foo:\\", "escape"),
    ],
)
def test_parse_set_credential_invalid(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_set_credential(text)


@pytest.mark.parametrize(
    "text,expected,kind",
    [
        ("foo:/etc/hostname", ("foo", "/etc/hostname"), "path"),
        ("foo:./relative/file", ("foo", "./relative/file"), "path"),
        ("foo:/run/sock", ("foo", "/run/sock"), "path"),
        ("foo:mycred", ("foo", "mycred"), "credential"),
        ("foo:a:b/c", ("foo", "a:b/c"), "path"),  # the rest is taken verbatim
    ],
)
def test_split_load_credential(text: str, expected: tuple[str, str], kind: str) -> None:
    assert split_load_credential(text) == expected
    assert credential_source_kind(expected[1]) == kind


@pytest.mark.parametrize("text", ["foo", "foo:", "foo:a:b", "bad/id:/x", "foo:" + "x" * 256])
def test_split_load_credential_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        split_load_credential(text)


# --------------------------------------------------------------------------------------
# --vsock-cid, --private-users
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", None),
        ("3", 3),
        ("4294967294", 0xFFFFFFFE),
        ("0x10", 16),  # safe_atou(): strtoul base 0
        ("010", 8),  # leading zero → octal, as in C
        ("0o10", 8),  # systemd's Python-style prefixes
        ("0b11", 3),
        (" 42", 42),
        ("+42", 42),
    ],
)
def test_parse_vsock_cid(text: str, expected: int | None) -> None:
    assert parse_vsock_cid(text) == expected


@pytest.mark.parametrize(
    "text,match",
    [
        ("0", "not regular"),
        ("1", "not regular"),
        ("2", "not regular"),
        ("hypervisor", "not regular"),  # symbolic names parse, then are refused
        ("local", "not regular"),
        ("host", "not regular"),
        ("any", "not regular"),
        ("4294967295", "not regular"),
        ("4294967296", "Invalid vsock CID"),
        ("-1", "Invalid vsock CID"),
        ("abc", "Invalid vsock CID"),
        ("3 ", "Invalid vsock CID"),
        ("08", "Invalid vsock CID"),
        ("HOST", "Invalid vsock CID"),
    ],
)
def test_parse_vsock_cid_invalid(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_vsock_cid(text)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("100000", (100000, 65536)),
        ("0", (0, 65536)),
        ("100000:65536", (100000, 65536)),
        ("100000:1", (100000, 1)),
        ("1000:0x10000", (1000, 65536)),  # NUIDS uses safe_atou32 (base prefixes ok)
        ("4294901759", (4294901759, 65536)),  # last UID 0xFFFFFFFE
        ("4294967294:1", (4294967294, 1)),
        ("65536:65535", (65536, 65535)),
    ],
)
def test_parse_private_users(text: str, expected: tuple[int, int]) -> None:
    assert parse_private_users(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "-1",
        "+1000",  # strict UID parsing: no sign
        "01000",  # no leading zero
        " 1000",  # no whitespace
        "0x1000",  # decimal only for the UID
        "65535",  # 16-bit -1 is not a valid UID
        "4294967295",
        "1000:0",  # empty range
        "1000:",
        "1000:x",
        "4294901760",  # 4294901760 + 65536 overflows uid_t
        "4294967294:2",
        "1:2:3",
        "yes",
        "pick",
        "identity",
    ],
)
def test_parse_private_users_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="UID"):
        parse_private_users(text)


# --------------------------------------------------------------------------------------
# hostnames, machine names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "foo", "foo-bar", "foo--bar", "Foo9", "foo.bar", "a.b.c", "x" * 64, "9", "a-b.c-d"])
def test_hostname_valid(name: str) -> None:
    assert is_valid_hostname(name)


@pytest.mark.parametrize(
    "name",
    ["", ".", "-a", "a-", "a.", ".a", "a..b", "a.-b", "a-.b", "x" * 65, "a_b", "a b", "caf\u00e9", ".host", "a/b"],
)
def test_hostname_invalid(name: str) -> None:
    assert not is_valid_hostname(name)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("foo", "foo"),
        ("my_vm", "myvm"),
        ("Fedora 40", "Fedora40"),
        ("-foo-", "foo"),
        ("..foo..bar..", "foo.bar"),
        ("foo-.bar", "foo-bar"),
        ("foo.-bar", "foo.bar"),
        ("foo--", "foo-"),  # only one trailing '-'/'.' is removed, as in systemd
        ("caf\u00e9", "caf"),
        ("x" * 70, "x" * 64),
        ("x" * 63 + "-y", "x" * 63),  # cut at 64, then the trailing '-' goes
        ("___", ""),
    ],
)
def test_hostname_cleanup(name: str, expected: str) -> None:
    assert hostname_cleanup(name) == expected


@given(st.text(max_size=100))
def test_hostname_cleanup_output_charset(name: str) -> None:
    out = hostname_cleanup(name)
    assert len(out) <= 64
    assert re.fullmatch(r"[A-Za-z0-9.-]*", out)
    assert not out.startswith((".", "-"))
    assert ".." not in out


@given(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}", fullmatch=True))
def test_hostname_cleanup_keeps_valid_short_names(name: str) -> None:
    assert is_valid_hostname(name)
    assert hostname_cleanup(name) == name


@pytest.mark.parametrize(
    "image,directory,expected",
    [
        ("/var/lib/machines/fedora.raw", None, "fedora"),
        ("/var/lib/machines/fedora.img", None, "fedora.img"),  # dots are fine in hostnames
        ("/var/lib/machines/fedora.qcow2", None, "fedora.qcow2"),
        ("/images/my_image.raw", None, "myimage"),
        ("/images/x.raw.raw", None, "x.raw"),  # only one .raw is stripped
        (None, "/var/lib/machines/debian", "debian"),
        (None, "/srv/Some Dir/", "SomeDir"),
        (None, "/", "myhost"),
        (None, "//", "myhost"),
        (None, "/srv/a/.", "a"),
    ],
)
def test_default_machine_name(image: str | None, directory: str | None, expected: str) -> None:
    assert default_machine_name(image, directory, "myhost") == expected


def test_default_machine_name_root_uses_cleaned_hostname() -> None:
    assert default_machine_name(None, "/", "host_name.example.com") == "hostname.example.com"


@pytest.mark.parametrize(
    "image,directory",
    [("/images/.raw", None), (None, "/srv/___"), (None, "/srv/a/.."), (None, None), ("/", None), (None, "/srv/--")],
)
def test_default_machine_name_fails(image: str | None, directory: str | None) -> None:
    with pytest.raises(ValueError, match="please use -M"):
        default_machine_name(image, directory, "myhost")


# --------------------------------------------------------------------------------------
# UUID, background, MAC
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0123456789abcdef0123456789abcdef", "01234567-89ab-cdef-0123-456789abcdef"),
        ("0123456789ABCDEF0123456789ABCDEF", "01234567-89ab-cdef-0123-456789abcdef"),
        ("01234567-89ab-cdef-0123-456789abcdef", "01234567-89ab-cdef-0123-456789abcdef"),
        ("01234567-89AB-CDEF-0123-456789ABCDEF", "01234567-89ab-cdef-0123-456789abcdef"),
        ("00000000000000000000000000000001", "00000000-0000-0000-0000-000000000001"),
    ],
)
def test_parse_uuid(text: str, expected: str) -> None:
    assert parse_uuid(text) == expected


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "Invalid UUID"),
        ("00000000000000000000000000000000", "all zeroes"),
        ("00000000-0000-0000-0000-000000000000", "all zeroes"),
        ("0123456789abcdef0123456789abcde", "Invalid UUID"),
        ("0123456789abcdef0123456789abcdef0", "Invalid UUID"),
        ("0123456789abcdef-0123456789abcdef", "Invalid UUID"),
        ("01234567-89abcdef-0123-456789abcdef", "Invalid UUID"),
        ("{01234567-89ab-cdef-0123-456789abcdef}", "Invalid UUID"),
        ("0123456789abcdef0123456789abcdeg", "Invalid UUID"),
        ("0123456789abcdef0123456789abcdef\n", "Invalid UUID"),
        (" 0123456789abcdef0123456789abcdef", "Invalid UUID"),
        ("\uff10123456789abcdef0123456789abcdef", "Invalid UUID"),  # fullwidth digit
    ],
)
def test_parse_uuid_invalid(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_uuid(text)


@given(st.uuids())
def test_parse_uuid_roundtrip(u: uuid.UUID) -> None:
    if u.int == 0:
        return
    assert parse_uuid(str(u)) == str(u)
    assert parse_uuid(u.hex.upper()) == str(u)


@pytest.mark.parametrize("text", ["", "40", "47", "48;2;12;34;56", "48;5;100", "0;1;32", "999"])
def test_parse_background_valid(text: str) -> None:
    assert parse_background(text) == text


@pytest.mark.parametrize("text", [";", "40;", ";40", "40;;41", "4 0", "40m", "\x1b[40m", "red", "\u0664\u0660", "-1"])
def test_parse_background_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="SGR"):
        parse_background(text)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("12:34:56:78:9a:bc", "12:34:56:78:9a:bc"),
        ("12:34:56:78:9A:BC", "12:34:56:78:9a:bc"),
        ("12-34-56-78-9a-bc", "12:34:56:78:9a:bc"),
        ("1234.5678.9abc", "12:34:56:78:9a:bc"),
        ("1:2:3:4:5:6", "01:02:03:04:05:06"),
        ("1.2.3", "00:01:00:02:00:03"),
    ],
)
def test_parse_ether_addr(text: str, expected: str) -> None:
    assert parse_ether_addr(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "12:34:56:78:9a",
        "12:34:56:78:9a:bc:de",
        "12:34:56:78:9a:bc:",
        "12:34-56:78:9a:bc",
        "123:34:56:78:9a:bc",
        "12::56:78:9a:bc",
        ":12:34:56:78:9a",
        "12:34:56:78:9a:bg",
        "123456789abc",
        "12345.6789.abcd",
        " 12:34:56:78:9a:bc",
        "192.168.0.1",
    ],
)
def test_parse_ether_addr_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="MAC address"):
        parse_ether_addr(text)


# --------------------------------------------------------------------------------------
# unit names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("machine.slice", "machine.slice"),
        ("foo", "foo.slice"),
        ("foo-bar", "foo-bar.slice"),
        ("foo.service", "foo.service"),  # any valid unit name is kept
        ("foo@bar.slice", "foo@bar.slice"),
        ("foo bar", "foo\\x20bar.slice"),
        ("a/b", "a-b.slice"),
        ("foo*", "foo\\x2a.slice"),  # no globbing
        ("caf\u00e9", "caf\\xc3\\xa9.slice"),
        ("foo.bar", "foo.bar.slice"),
        ("/foo/bar", "foo-bar.mount"),  # absolute paths become mount units, like systemd
        ("/", "-.mount"),
        ("/dev/sda", "dev-sda.device"),
        ("/sys/class/x", "sys-class-x.device"),
        ("/dev", "dev.mount"),  # /dev itself is not a device path
        ("/foo/../bar", "-foo-..-bar.slice"),  # not normalizable → plain mangling
        ("/.hidden", "\\x2ehidden.mount"),
        ("x" * 249, "x" * 249 + ".slice"),
    ],
)
def test_mangle_unit_name(name: str, expected: str) -> None:
    assert mangle_unit_name(name, ".slice") == expected


@pytest.mark.parametrize("name", ["", "@foo", "x" * 250, "\u00e9" * 80])
def test_mangle_unit_name_invalid(name: str) -> None:
    with pytest.raises(ValueError, match="unit name"):
        mangle_unit_name(name, ".slice")


def test_mangle_unit_name_bad_suffix() -> None:
    with pytest.raises(ValueError, match="suffix"):
        mangle_unit_name("foo", "slice")
    with pytest.raises(ValueError, match="suffix"):
        mangle_unit_name("foo", ".bogus")


def test_mangle_unit_name_long_path_is_refused_not_hashed() -> None:
    # systemd would fall back to a hashed unit name here; we refuse instead.
    with pytest.raises(ValueError, match="too long"):
        mangle_unit_name("/" + "/".join(["a" * 100] * 3), ".slice")
    # A path component longer than NAME_MAX is not a valid path: plain mangling, which is
    # then too long to be a unit name — the same error systemd reports.
    with pytest.raises(ValueError, match="unit name"):
        mangle_unit_name("/" + "a" * 300, ".slice")


# --------------------------------------------------------------------------------------
# Differential tests against systemd's own C implementation
# --------------------------------------------------------------------------------------

# Only library versions whose behaviour has been checked against ours (the known,
# deliberate differences are excluded below); on other hosts these tests are skipped.
_VERIFIED_VERSIONS = {"252"}


def _load_libsystemd_shared() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    candidates = glob.glob("/usr/lib/*/systemd/libsystemd-shared-*.so") + glob.glob("/usr/lib/systemd/libsystemd-shared-*.so")
    for path in sorted(candidates):
        m = re.search(r"libsystemd-shared-(\d+)\.so$", path)
        if not m or m.group(1) not in _VERIFIED_VERSIONS:
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return lib, libc
    return None


_LIBS = _load_libsystemd_shared()
needs_libsystemd = pytest.mark.skipif(_LIBS is None, reason="libsystemd-shared-252.so not available")
_oracle_settings = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _c(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _ours(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError:
        return "ERR"


class _Oracle:
    """Thin ctypes wrappers; each returns the value or "ERR" for a negative errno."""

    def __init__(self, lib: ctypes.CDLL, libc: ctypes.CDLL) -> None:
        self.lib, self.libc = lib, libc
        libc.free.argtypes = [ctypes.c_void_p]
        lib.cunescape_length_with_prefix.restype = ctypes.c_ssize_t
        lib.cunescape_length_with_prefix.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        lib.extract_first_word.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        lib.hostname_is_valid.restype = ctypes.c_bool
        lib.credential_name_valid.restype = ctypes.c_bool
        lib.unit_name_mangle_with_suffix.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        lib.strv_split_full.argtypes = [
            ctypes.POINTER(ctypes.POINTER(ctypes.c_char_p)),
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
        ]

    def parse_size(self, s: str) -> Any:
        out = ctypes.c_uint64()
        r = self.lib.parse_size(_c(s), ctypes.c_uint64(1024), ctypes.byref(out))
        return out.value if r >= 0 else "ERR"

    def parse_boolean(self, s: str) -> Any:
        r = self.lib.parse_boolean(_c(s))
        return bool(r) if r >= 0 else "ERR"

    def cunescape(self, s: str) -> Any:
        b, out = _c(s), ctypes.c_void_p()
        r = self.lib.cunescape_length_with_prefix(b, len(b), None, 1 << 1, ctypes.byref(out))  # ACCEPT_NUL
        if r < 0 or out.value is None:
            return "ERR"
        data = ctypes.string_at(out.value, r)
        self.libc.free(out)
        return data

    def extract(self, s: str, seps: str) -> Any:
        buf = ctypes.create_string_buffer(_c(s))
        p = ctypes.c_void_p(ctypes.addressof(buf))
        w = ctypes.c_void_p()
        r = self.lib.extract_first_word(ctypes.byref(p), ctypes.byref(w), _c(seps), 1 << 6)  # DONT_COALESCE
        if r < 0:
            return "ERR"
        word = ctypes.string_at(w.value) if w.value else b""
        if w.value:
            self.libc.free(w)
        rest = None if p.value is None else ctypes.string_at(p.value)
        return (
            word.decode("utf-8", "surrogateescape"),
            None if rest is None else rest.decode("utf-8", "surrogateescape"),
        )

    def hostname_is_valid(self, s: str) -> bool:
        return bool(self.lib.hostname_is_valid(_c(s), 0))

    def hostname_cleanup(self, s: str) -> str:
        buf = ctypes.create_string_buffer(_c(s))
        self.lib.hostname_cleanup(buf)
        return buf.value.decode()

    def credential_name_valid(self, s: str) -> bool:
        return bool(self.lib.credential_name_valid(_c(s)))

    def id128(self, s: str) -> Any:
        out = (ctypes.c_uint8 * 16)()
        if self.lib.sd_id128_from_string(_c(s), out) < 0 or bytes(out) == bytes(16):
            return "ERR"
        return str(uuid.UUID(bytes=bytes(out)))

    def safe_atou(self, s: str, base: int) -> Any:
        out = ctypes.c_uint()
        r = self.lib.safe_atou_full(_c(s), ctypes.c_uint(base), ctypes.byref(out))
        return out.value if r >= 0 else "ERR"

    def parse_uid(self, s: str) -> Any:
        out = ctypes.c_uint32()
        return out.value if self.lib.parse_uid(_c(s), ctypes.byref(out)) >= 0 else "ERR"

    def ether(self, s: str) -> Any:
        out = (ctypes.c_uint8 * 6)()
        if self.lib.parse_ether_addr(_c(s), out) < 0:
            return "ERR"
        return ":".join(f"{b:02x}" for b in bytes(out))

    def mangle(self, s: str, suffix: str) -> Any:
        out = ctypes.c_void_p()
        if self.lib.unit_name_mangle_with_suffix(_c(s), None, 0, _c(suffix), ctypes.byref(out)) < 0:
            return "ERR"
        assert out.value is not None
        v = ctypes.string_at(out.value).decode("utf-8", "surrogateescape")
        self.libc.free(out)
        return v

    def split_extra(self, s: str) -> Any:
        out = ctypes.POINTER(ctypes.c_char_p)()
        if self.lib.strv_split_full(ctypes.byref(out), _c(s), None, (1 << 5) | (1 << 1)) < 0:  # UNQUOTE|CUNESCAPE
            return "ERR"
        words, i = [], 0
        while out[i] is not None:
            words.append(out[i].decode("utf-8", "surrogateescape"))
            i += 1
        return words


@pytest.fixture(scope="module")
def oracle() -> _Oracle:
    libs = _LIBS
    if libs is None:
        pytest.skip("libsystemd-shared-252.so not available")
        raise AssertionError("unreachable")
    return _Oracle(*libs)


def _no_nul(s: str) -> bool:
    return "\0" not in s


# systemd 252 still accepted UTF-16 surrogates in \u escapes; current systemd (and we)
# refuse them.  Inputs containing such an escape are excluded from the comparison.
_SURROGATE_U = re.compile(r"\\u[dD][89a-fA-F]")

_size_text = st.one_of(
    st.text(alphabet="0123456789.  \t\v\n+-KMGTPEBkx", max_size=14),
    st.from_regex(r"\A[ \t]*[0-9]{0,21}(\.[0-9]{0,21})?[ ]?[EPTGMKB]?([0-9]{0,3}[KB]?)?\Z"),
).filter(lambda s: not s.lstrip(" \t\n\r\v\f").startswith("-"))  # "\v-1": see parse_size docstring


@needs_libsystemd
@_oracle_settings
@given(text=_size_text)
def test_oracle_parse_size(oracle: _Oracle, text: str) -> None:
    assert _ours(parse_size, text) == oracle.parse_size(text)


@needs_libsystemd
@_oracle_settings
@given(text=st.text(max_size=6).filter(_no_nul))
def test_oracle_parse_boolean(oracle: _Oracle, text: str) -> None:
    assert _ours(parse_boolean, text) == oracle.parse_boolean(text)


@needs_libsystemd
@_oracle_settings
@given(
    text=st.text(alphabet="\\abfnrtvs\"'xuU01234567ABCDEFabcdefz \u00e9\U0001f600", max_size=16).filter(
        lambda s: not _SURROGATE_U.search(s)
    )
)
def test_oracle_cunescape(oracle: _Oracle, text: str) -> None:
    assert _ours(c_unescape, text) == oracle.cunescape(text)


@needs_libsystemd
@_oracle_settings
@given(text=st.text(alphabet="ab:\\ ,\u00e9", max_size=12))
def test_oracle_extract_first_word(oracle: _Oracle, text: str) -> None:
    assert _ours(extract_first_word, text, ":") == oracle.extract(text, ":")


@needs_libsystemd
@_oracle_settings
@given(text=st.text(alphabet="ab \t\n\"'\\nsx0A\u00e9", max_size=16).filter(lambda s: not _SURROGATE_U.search(s)))
def test_oracle_split_qemu_extra(oracle: _Oracle, text: str) -> None:
    assert _ours(split_qemu_extra, text) == oracle.split_extra(text)


@needs_libsystemd
@_oracle_settings
@given(text=st.one_of(st.text(alphabet="ab.-_9Z\u00e9 ", max_size=70), st.text(max_size=10)).filter(_no_nul))
def test_oracle_hostname(oracle: _Oracle, text: str) -> None:
    assert is_valid_hostname(text) == oracle.hostname_is_valid(text)
    assert hostname_cleanup(text) == oracle.hostname_cleanup(text)


@needs_libsystemd
@_oracle_settings
@given(
    text=st.one_of(
        st.text(alphabet="ab./: \x7f\x1f\u00e9~", max_size=5),
        st.text(alphabet="a", min_size=250, max_size=260),
    )
)
def test_oracle_credential_name(oracle: _Oracle, text: str) -> None:
    assert credential_name_is_valid(text) == oracle.credential_name_valid(text)


@needs_libsystemd
@_oracle_settings
@given(
    text=st.one_of(
        st.text(alphabet="0123456789abcdefABCDEF-", min_size=30, max_size=37),
        st.uuids().map(str),
        st.uuids().map(lambda u: u.hex.upper()),
        st.text(max_size=8).filter(_no_nul),
    )
)
def test_oracle_uuid(oracle: _Oracle, text: str) -> None:
    assert _ours(parse_uuid, text) == oracle.id128(text)


@needs_libsystemd
@_oracle_settings
@given(text=st.text(alphabet="0123456789abxXoO+- \t\v", max_size=12))
def test_oracle_safe_atou_base0(oracle: _Oracle, text: str) -> None:
    # The number syntax of --vsock-cid and of --private-users' NUIDS.
    assert _ours(P._safe_atou, text, 0, 32) == oracle.safe_atou(text, 0)


@needs_libsystemd
@_oracle_settings
@given(text=st.text(alphabet="0123456789+- x", max_size=11))
def test_oracle_parse_uid(oracle: _Oracle, text: str) -> None:
    assert _ours(P._parse_uid, text) == oracle.parse_uid(text)


@needs_libsystemd
@_oracle_settings
@given(text=st.text(alphabet="0123456789abcdefABCDEF:-.g ", max_size=20))
def test_oracle_ether_addr(oracle: _Oracle, text: str) -> None:
    assert _ours(parse_ether_addr, text) == oracle.ether(text)


@needs_libsystemd
@_oracle_settings
@given(
    text=st.one_of(
        st.text(alphabet="ab/.@-_:\\ *?[]\u00e9", max_size=12),
        st.text(alphabet="/devsys.a", max_size=12),
        st.text(max_size=6).filter(_no_nul),
    ),
    suffix=st.sampled_from([".slice", ".service", ".scope"]),
)
def test_oracle_mangle_unit_name(oracle: _Oracle, text: str, suffix: str) -> None:
    assert _ours(mangle_unit_name, text, suffix) == oracle.mangle(text, suffix)


# --- --cpus: QEMU's -smp rules -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1",
        "4",
        "4,sockets=2",
        "cores=2,threads=1",
        "2,maxcpus=8",
        "0x2",
        "+2",
        "2,",
        "8,sockets=2,dies=1,clusters=1,cores=2,threads=2",
    ],
)
def test_parse_smp_accepts_what_qemu_accepts(text: str) -> None:
    from vmspawnd.spec.parsers import parse_smp

    assert parse_smp(text) == text  # passed to -smp verbatim


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0", "at least 1"),  # QEMU 7.2: "Deprecated CPU topology (considered invalid)"; 9.0+: an error
        ("2,cores=0", "cores must be at least 1"),
        ("-1", "whole number"),
        ("1.5", "whole number"),
        ("abc", "whole number"),
        ("2,foo=1", "unknown -smp property 'foo'"),
        (",2", "''"),
        ("2,4", "not KEY=NUMBER"),
        ("", "empty"),
        ("1 2", "whole number"),
    ],
)
def test_parse_smp_refuses_what_qemu_refuses(text: str, says: str) -> None:
    from vmspawnd.spec.parsers import parse_smp

    with pytest.raises(ValueError) as info:
        parse_smp(text)
    assert says in str(info.value) and "expected a QEMU -smp value" in str(info.value)
