# SPDX-License-Identifier: LGPL-2.1-or-later
"""SipHash-2-4 and the vmspawn identifiers derived from it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.qemu.siphash import (
    SHORTEN_IFNAME_HASH_KEY,
    VM_TAP_HASH_KEY,
    VSOCK_CID_HASH_KEY,
    SipHash24,
    derive_mac,
    derive_vsock_cid_candidates,
    shorten_ifname,
    shorten_tap_name,
    siphash24,
)

# The 64 SipHash-2-4 test vectors of the reference implementation (vectors.h,
# "vectors_sip64"; also the SipHash paper's appendix): key 00 01 … 0f, message i = bytes
# 00 01 … (i-1), output as the 8 little-endian bytes of the 64-bit result.
REFERENCE_VECTORS = [
    "310e0edd47db6f72",
    "fd67dc93c539f874",
    "5a4fa9d909806c0d",
    "2d7efbd796666785",
    "b7877127e09427cf",
    "8da699cd64557618",
    "cee3fe586e46c9cb",
    "37d1018bf50002ab",
    "6224939a79f5f593",
    "b0e4a90bdf82009e",
    "f3b9dd94c5bb5d7a",
    "a7ad6b22462fb3f4",
    "fbe50e86bc8f1e75",
    "903d84c02756ea14",
    "eef27a8e90ca23f7",
    "e545be4961ca29a1",
    "db9bc2577fcc2a3f",
    "9447be2cf5e99a69",
    "9cd38d96f0b3c14b",
    "bd6179a71dc96dbb",
    "98eea21af25cd6be",
    "c7673b2eb0cbf2d0",
    "883ea3e395675393",
    "c8ce5ccd8c030ca8",
    "94af49f6c650adb8",
    "eab8858ade92e1bc",
    "f315bb5bb835d817",
    "adcf6b0763612e2f",
    "a5c91da7acaa4dde",
    "716595876650a2a6",
    "28ef495c53a387ad",
    "42c341d8fa92d832",
    "ce7cf2722f512771",
    "e37859f94623f3a7",
    "381205bb1ab0e012",
    "ae97a10fd434e015",
    "b4a31508beff4d31",
    "81396229f0907902",
    "4d0cf49ee5d4dcca",
    "5c73336a76d8bf9a",
    "d0a704536ba93e0e",
    "925958fcd6420cad",
    "a915c29bc8067318",
    "952b79f3bc0aa6d4",
    "f21df2e41d4535f9",
    "87577519048f53a9",
    "10a56cf5dfcd9adb",
    "eb75095ccd986cd0",
    "51a9cb9ecba312e6",
    "96afadfc2ce666c7",
    "72fe52975a4364ee",
    "5a1645b276d592a1",
    "b274cb8ebf87870a",
    "6f9bb4203de7b381",
    "eaecb2a30b22a87f",
    "9924a43cc1315724",
    "bd838d3aafbf8db7",
    "0b1a2a3265d51aea",
    "135079a3231ce660",
    "932b2846e4d70666",
    "e1915f5cb1eca46c",
    "f325965ca16d629f",
    "575ff28e60381be5",
    "724506eb4c328a95",
]
REFERENCE_KEY = bytes(range(16))


@pytest.mark.parametrize("length", range(64))
def test_reference_vectors_one_shot(length: int) -> None:
    expected = int.from_bytes(bytes.fromhex(REFERENCE_VECTORS[length]), "little")
    assert siphash24(REFERENCE_KEY, bytes(range(length))) == expected


@pytest.mark.parametrize("length", range(64))
def test_reference_vectors_incremental_bytewise(length: int) -> None:
    h = SipHash24(REFERENCE_KEY)
    for b in range(length):
        h.update(bytes([b]))
    assert h.digest() == bytes.fromhex(REFERENCE_VECTORS[length])


def test_vector_count_and_uniqueness() -> None:
    assert len(REFERENCE_VECTORS) == 64
    assert len(set(REFERENCE_VECTORS)) == 64


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_incremental_split_points_do_not_matter(data: bytes, cuts: list[int]) -> None:
    h = SipHash24(REFERENCE_KEY)
    prev = 0
    for cut in sorted(min(c, len(data)) for c in cuts):
        h.update(data[prev:cut])
        prev = cut
    h.update(data[prev:])
    assert h.digest_int() == siphash24(REFERENCE_KEY, data)


@given(st.binary(max_size=40), st.binary(max_size=40), st.binary(min_size=16, max_size=16))
def test_copy_is_independent_and_digest_is_non_destructive(a: bytes, b: bytes, key: bytes) -> None:
    h = SipHash24(key)
    h.update(a)
    before = h.digest_int()
    assert h.digest_int() == before  # digest does not consume the state
    c = h.copy()
    c.update(b)
    assert h.digest_int() == before == siphash24(key, a)
    assert c.digest_int() == siphash24(key, a + b)


@pytest.mark.parametrize("key", [b"", b"x" * 15, b"x" * 17])
def test_key_must_be_16_bytes(key: bytes) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        SipHash24(key)


def test_keys_are_the_systemd_constants() -> None:
    assert VSOCK_CID_HASH_KEY == bytes(
        [0x03, 0xAD, 0xF0, 0xA4, 0x59, 0x2C, 0x77, 0x11, 0xDA, 0x39, 0x0C, 0xBA, 0xF5, 0x4C, 0x80, 0x52]
    )
    assert SHORTEN_IFNAME_HASH_KEY == bytes.fromhex("e190a404a8ef4b518cccc33a9f11fca2")
    assert VM_TAP_HASH_KEY == bytes.fromhex("01d0c64c2bdf24fbc0f8b2097d59b293")


# Independent oracle values, computed with OpenSSL's SipHash implementation, e.g.
#   printf 'foo\x00\x00\x00\x00' | openssl mac -macopt hexkey:03adf0a4592c7711da390cbaf54c8052 \
#       -macopt size:8 SIPHASH
# (OpenSSL prints the 8 output bytes in little-endian order).
OPENSSL_CID_FOO_0 = "77DFE0F7E03772F4"  # name "foo", attempt 0
OPENSSL_CID_FOO_63 = "5CE991C6535955D0"  # name "foo", attempt 63
OPENSSL_IFNAME_LONG = "5929CBB776E7884F"  # "vt-averyveryverylongname"
OPENSSL_MAC_MYVM = "B76E5B32792FCE51"  # machine id 00112233…eeff ‖ "myvm"


def _le(hexstr: str) -> int:
    return int.from_bytes(bytes.fromhex(hexstr), "little")


def test_cid_candidates_match_openssl_oracle() -> None:
    cids = derive_vsock_cid_candidates("foo")
    assert len(cids) == 64
    assert cids[0] == 3 + _le(OPENSSL_CID_FOO_0) % 4294967291 == 3189503731
    assert cids[63] == 3 + _le(OPENSSL_CID_FOO_63) % 4294967291 == 3627853842


def test_cid_candidates_follow_the_copy_then_absorb_counter_scheme() -> None:
    # Equivalent formulation: one-shot hash of name ‖ le32(i).
    cids = derive_vsock_cid_candidates("my-vm")
    for i, cid in enumerate(cids):
        assert cid == 3 + siphash24(VSOCK_CID_HASH_KEY, b"my-vm" + struct.pack("<I", i)) % 4294967291


@given(st.from_regex(r"[a-z0-9][a-z0-9-]{0,30}", fullmatch=True))
def test_cid_candidates_are_regular_and_deterministic(name: str) -> None:
    cids = derive_vsock_cid_candidates(name)
    assert cids == derive_vsock_cid_candidates(name)
    assert all(3 <= c <= 0xFFFFFFFD for c in cids)  # never 0, 1, 2 or VMADDR_CID_ANY


def test_cid_rejects_non_ascii_and_empty() -> None:
    with pytest.raises(ValueError):
        derive_vsock_cid_candidates("")
    with pytest.raises(ValueError):
        derive_vsock_cid_candidates("m\u00e4chine")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("a", "vt-a"),
        ("foo", "vt-foo"),
        ("twelve-chars", "vt-twelve-chars"),  # 15 bytes: still fits (IFNAMSIZ - 1)
    ],
)
def test_short_tap_names_unchanged(name: str, expected: str) -> None:
    assert shorten_tap_name(name) == expected


def test_long_tap_name_matches_openssl_oracle() -> None:
    h = _le(OPENSSL_IFNAME_LONG) & 0xFFFFFF
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tail = "".join(alphabet[(h >> s) & 63] for s in (18, 12, 6, 0))
    assert shorten_tap_name("averyveryverylongname") == "vt-averyver" + tail == "vt-averyveryylZ"


def test_sixteen_bytes_is_already_too_long() -> None:
    # "vt-" + 13 chars = 16 bytes = IFNAMSIZ, which leaves no room for the NUL.
    name = "thirteen-char"
    assert len("vt-" + name) == 16
    short = shorten_tap_name(name)
    assert len(short) == 15 and short.startswith("vt-thirteen")


@given(st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9.-]{0,62}", fullmatch=True))
def test_tap_names_always_fit_and_keep_prefix(name: str) -> None:
    tap = shorten_tap_name(name)
    assert tap.startswith("vt-")
    assert len(tap.encode()) <= 15
    if len(name) <= 12:
        assert tap == "vt-" + name
    else:
        assert tap[:11] == ("vt-" + name)[:11]
        assert all(c.isalnum() or c in "-_" for c in tap[11:])


def test_shorten_ifname_generic() -> None:
    assert shorten_ifname("short") == "short"
    assert shorten_ifname("ve-averyveryverylongname") != shorten_ifname("vt-averyveryverylongname")


def test_mac_matches_openssl_oracle() -> None:
    machine_id = bytes.fromhex("00112233445566778899aabbccddeeff")
    raw = bytearray(bytes.fromhex(OPENSSL_MAC_MYVM)[:6])
    raw[0] = (raw[0] & 0xFE) | 0x02
    expected = ":".join(f"{b:02x}" for b in raw)
    assert derive_mac(machine_id, "myvm") == expected == "b6:6e:5b:32:79:2f"


@given(st.binary(min_size=16, max_size=16), st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True))
def test_mac_is_unicast_locally_administered(machine_id: bytes, name: str) -> None:
    mac = derive_mac(machine_id, name)
    octets = [int(x, 16) for x in mac.split(":")]
    assert len(octets) == 6
    assert octets[0] & 0x01 == 0  # unicast
    assert octets[0] & 0x02 == 0x02  # locally administered
    assert mac == mac.lower()


@pytest.mark.parametrize("machine_id", [b"", b"0" * 32, bytes(15)])
def test_mac_needs_raw_16_byte_machine_id(machine_id: bytes) -> None:
    with pytest.raises(ValueError, match="16 raw bytes"):
        derive_mac(machine_id, "vm")
