# SPDX-License-Identifier: LGPL-2.1-or-later
"""SipHash-2-4 and the identifiers systemd-vmspawn derives from it.

vmspawn derives three things deterministically from the machine name with SipHash-2-4
(docs/reference/systemd-vmspawn.md §3.7, §3.8): the vsock CID candidates, the shortened TAP interface name and
the TAP MAC address.  Python's standard library exposes no keyed SipHash (``hash()`` is
salted and, since 3.11, SipHash-1-3), so to produce the *same* values as systemd we carry
a small pure-Python implementation here.  Everything in this module is pure: no I/O,
no randomness; the caller supplies the host machine ID where one is needed.
"""

from __future__ import annotations

import struct

__all__ = [
    "SipHash24",
    "siphash24",
    "VSOCK_CID_HASH_KEY",
    "SHORTEN_IFNAME_HASH_KEY",
    "VM_TAP_HASH_KEY",
    "VSOCK_CID_ATTEMPTS",
    "IFNAMSIZ",
    "derive_vsock_cid_candidates",
    "shorten_ifname",
    "shorten_tap_name",
    "derive_mac",
]

_MASK64 = 0xFFFFFFFFFFFFFFFF

#: Key of vsock_fix_child_cid() (src/vmspawn/vmspawn-util.c), "picked from /dev/urandom".
VSOCK_CID_HASH_KEY = bytes.fromhex("03adf0a4592c7711da390cbaf54c8052")
#: SHORTEN_IFNAME_HASH_KEY of net_shorten_ifname() (src/shared/netif-util.c).
SHORTEN_IFNAME_HASH_KEY = bytes.fromhex("e190a404a8ef4b518cccc33a9f11fca2")
#: VM_TAP_HASH_KEY used by vmspawn for net_generate_mac() of the TAP NIC.
VM_TAP_HASH_KEY = bytes.fromhex("01d0c64c2bdf24fbc0f8b2097d59b293")

#: Number of hashed CID tries before vmspawn falls back to random CIDs.
VSOCK_CID_ATTEMPTS = 64
#: Linux IFNAMSIZ, including the terminating NUL: names must be at most 15 bytes.
IFNAMSIZ = 16

# CID = 3 + h % (UINT_MAX - 4): 0, 1, 2 and 0xFFFFFFFF are reserved CIDs.
_CID_MODULUS = 0xFFFFFFFF - 4
_URLSAFE_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK64


class SipHash24:
    """Incremental SipHash-2-4 with a 64-bit result.

    The incremental form exists because vmspawn's CID derivation absorbs the machine name
    once and then *copies* that state for each attempt before absorbing the attempt
    counter; :meth:`copy` reproduces ``state = machine_hash_state`` in the C code.
    """

    __slots__ = ("_v0", "_v1", "_v2", "_v3", "_buffer", "_length")

    def __init__(self, key: bytes) -> None:
        """Start a hash keyed with the 16-byte ``key`` (k0, k1 little-endian)."""
        if not isinstance(key, (bytes, bytearray, memoryview)) or len(key) != 16:
            raise ValueError("SipHash-2-4 key must be exactly 16 bytes")
        k0 = int.from_bytes(key[:8], "little")
        k1 = int.from_bytes(key[8:], "little")
        self._v0 = k0 ^ 0x736F6D6570736575
        self._v1 = k1 ^ 0x646F72616E646F6D
        self._v2 = k0 ^ 0x6C7967656E657261
        self._v3 = k1 ^ 0x7465646279746573
        self._buffer = b""
        self._length = 0

    def _rounds(self, n: int) -> None:
        v0, v1, v2, v3 = self._v0, self._v1, self._v2, self._v3
        for _ in range(n):
            v0 = (v0 + v1) & _MASK64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _MASK64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _MASK64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _MASK64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)
        self._v0, self._v1, self._v2, self._v3 = v0, v1, v2, v3

    def _compress(self, m: int) -> None:
        self._v3 ^= m
        self._rounds(2)
        self._v0 ^= m

    def update(self, data: bytes) -> None:
        """Absorb ``data``; may be called any number of times (split points do not matter)."""
        data = bytes(data)
        self._length += len(data)
        buf = self._buffer + data
        full = len(buf) - len(buf) % 8
        for off in range(0, full, 8):
            self._compress(int.from_bytes(buf[off : off + 8], "little"))
        self._buffer = buf[full:]

    def copy(self) -> SipHash24:
        """Return an independent copy of the current state (C struct assignment)."""
        other = SipHash24.__new__(SipHash24)
        other._v0, other._v1, other._v2, other._v3 = self._v0, self._v1, self._v2, self._v3
        other._buffer = self._buffer
        other._length = self._length
        return other

    def digest_int(self) -> int:
        """Finalize and return the 64-bit hash as an integer (siphash24_finalize()).

        The object itself is left untouched, so more data may still be absorbed.
        """
        f = self.copy()
        b = ((f._length & 0xFF) << 56) | int.from_bytes(f._buffer, "little")
        f._compress(b)
        f._v2 ^= 0xFF
        f._rounds(4)
        return f._v0 ^ f._v1 ^ f._v2 ^ f._v3

    def digest(self) -> bytes:
        """The 64-bit hash as 8 little-endian bytes (the reference implementation's output)."""
        return self.digest_int().to_bytes(8, "little")


def siphash24(key: bytes, data: bytes) -> int:
    """One-shot SipHash-2-4 of ``data`` under the 16-byte ``key``, as a 64-bit integer."""
    h = SipHash24(key)
    h.update(data)
    return h.digest_int()


def _ascii_name(name: str, what: str) -> bytes:
    """Machine names are hostname-valid ASCII; refuse anything else instead of guessing an encoding."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string")
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be ASCII (a valid machine/host name): {name!r}") from None


def derive_vsock_cid_candidates(name: str) -> list[int]:
    """The 64 CIDs vmspawn tries, in order, for machine ``name`` (docs/reference/systemd-vmspawn.md §3.7).

    SipHash-2-4 keyed with :data:`VSOCK_CID_HASH_KEY` absorbs the name bytes (no NUL); for
    attempt ``i`` the state is copied, the 4-byte little-endian ``i`` absorbed (the C code
    hashes a native ``unsigned``; every architecture vmspawn runs on here is little-endian),
    and ``CID = 3 + h % 4294967291``.  The caller tries each with VHOST_VSOCK_SET_GUEST_CID
    and moves on only on EADDRINUSE; the random fallback is not derived here.
    """
    base = SipHash24(VSOCK_CID_HASH_KEY)
    base.update(_ascii_name(name, "machine name"))
    cids = []
    for i in range(VSOCK_CID_ATTEMPTS):
        state = base.copy()
        state.update(struct.pack("<I", i))
        cids.append(3 + state.digest_int() % _CID_MODULUS)
    return cids


def shorten_ifname(ifname: str) -> str:
    """Shorten an interface name the way systemd's net_shorten_ifname() does.

    Names shorter than IFNAMSIZ (i.e. at most 15 bytes) are returned unchanged.  Longer
    ones keep their first 11 bytes followed by four URL-safe base64 characters of the low
    24 bits of SipHash-2-4 of the *whole* original name (key :data:`SHORTEN_IFNAME_HASH_KEY`),
    so distinct long names stay distinct with high probability.
    """
    raw = _ascii_name(ifname, "interface name")
    if len(raw) < IFNAMSIZ:
        return ifname
    h = siphash24(SHORTEN_IFNAME_HASH_KEY, raw)
    tail = "".join(_URLSAFE_BASE64[(h >> shift) & 63] for shift in (18, 12, 6, 0))
    return raw[: IFNAMSIZ - 5].decode("ascii") + tail


def shorten_tap_name(name: str) -> str:
    """TAP interface name for machine ``name``: ``vt-NAME``, shortened as in docs/reference/systemd-vmspawn.md §3.8.

    systemd-networkd's shipped ``80-vm-vt.network`` matches ``vt-*``, so the prefix must
    survive shortening (it does: the first 11 bytes are kept).
    """
    return shorten_ifname("vt-" + name)


def derive_mac(machine_id: bytes, name: str) -> str:
    """Predictable MAC of the VM side of the TAP NIC (net_generate_mac(), §3.8).

    SipHash-2-4 keyed with :data:`VM_TAP_HASH_KEY` over the host's 16 raw machine-ID bytes
    followed by the machine name; the first 6 bytes of the little-endian result, with the
    multicast bit cleared and the locally-administered bit set.  ``machine_id`` is passed
    in (not read from /etc/machine-id) to keep this function pure.
    """
    if not isinstance(machine_id, (bytes, bytearray)) or len(machine_id) != 16:
        raise ValueError("machine ID must be 16 raw bytes (the 128-bit ID, not its hex form)")
    h = siphash24(VM_TAP_HASH_KEY, bytes(machine_id) + _ascii_name(name, "machine name"))
    octets = bytearray(h.to_bytes(8, "little")[:6])
    octets[0] &= 0xFE  # clear multicast bit
    octets[0] |= 0x02  # set locally administered bit
    return ":".join(f"{b:02x}" for b in octets)
