# SPDX-License-Identifier: LGPL-2.1-or-later
"""The unprivileged identity each VM's QEMU and swtpm run as on the system instance.

One uid=gid per VM, taken from a reserved range, not one shared `qemu` user: without an
LSM (libvirt's sVirt labels), processes of one shared user may ptrace, signal and read
each other, so a guest that escapes one QEMU would own every other VM. Per-VM ids give
that separation with plain DAC and need no user created by an installer (docs/security.md).

The default range is 0x70000000 + 64 Ki: systemd's UIDS-GIDS.md leaves 1879048192…
2147352575 unused (above the nspawn container ranges, below the foreign range and the
2^31 line), and unlike 65536…524287 it does not collide with the /etc/subuid blocks
useradd hands out from 100000.

A VM's id is recorded as the owner of its directory (machines/ID/, chowned at start), so a
restarted daemon knows which ids are taken without reading anything the VM could write.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_FIRST = 0x70000000
DEFAULT_COUNT = 0x10000


@dataclasses.dataclass(frozen=True)
class VmIdentity:
    """uid and gid (equal) of one VM's processes."""

    uid: int
    gid: int


@dataclasses.dataclass(frozen=True)
class IdRange:
    """The ids the daemon may hand out: first … first + count - 1."""

    first: int = DEFAULT_FIRST
    count: int = DEFAULT_COUNT

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.first <= value < self.first + self.count


def parse_range(text: str) -> IdRange:
    """`FIRST-LAST` (decimal or 0x…), inclusive, as `--vm-id-range` takes it."""
    first_text, sep, last_text = text.partition("-")
    if not sep:
        raise ValueError(f"expected FIRST-LAST, got {text!r}")
    first, last = int(first_text, 0), int(last_text, 0)
    if not 0 < first <= last < 0xFFFFFFFF:
        raise ValueError(f"invalid id range {text!r}")
    if first < 65536:
        raise ValueError(f"{text!r} overlaps the 16-bit system and user ids (0…65535)")
    return IdRange(first, last - first + 1)


def known_to_nss(value: int) -> bool:
    """A uid or gid some user or group database already names: never ours to hand out."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(value)
            return True
        except KeyError:
            pass
    return False


def pick_identity(ids: IdRange, in_use: Iterable[int], named: Callable[[int], bool] = known_to_nss) -> VmIdentity:
    """The lowest id of the range no VM holds and no user or group database names."""
    taken = set(in_use)
    for value in range(ids.first, ids.first + ids.count):
        if value not in taken and not named(value):
            return VmIdentity(value, value)
    raise LookupError(f"every id of {ids.first}…{ids.first + ids.count - 1} is in use")


def ids_in_use(machines_dir: Path, ids: IdRange) -> set[int]:
    """Owners of the VM directories that are in the range (each VM's directory is owned by its id)."""
    found: set[int] = set()
    for entry in machines_dir.iterdir():
        try:
            owner = os.lstat(entry).st_uid
        except FileNotFoundError:
            continue
        if owner in ids:
            found.add(owner)
    return found


def hand_over(path: Path, identity: VmIdentity) -> None:
    """Make a file, socket or directory the VM's (never following a symlink)."""
    os.chown(path, identity.uid, identity.gid, follow_symlinks=False)


def hand_over_tree(path: Path, identity: VmIdentity) -> None:
    """A directory and everything in it (the TPM state): the VM's."""
    hand_over(path, identity)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            hand_over(Path(root) / name, identity)
