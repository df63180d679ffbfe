# SPDX-License-Identifier: LGPL-2.1-or-later
"""vhost-vsock for a VM: is it there, and which guest CID (docs/reference/systemd-vmspawn.md §3.7).

vmspawn opens /dev/vhost-vsock itself and claims the CID with VHOST_VSOCK_SET_GUEST_CID
before QEMU starts (QEMU gets the fd as `vhostfd=`), so a collision shows up as
EADDRINUSE here instead of as a QEMU failure. Candidates: an explicit --vsock-cid (one
try, failure fatal), else the 64 SipHash-derived CIDs of the machine name, else 64
random ones.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import struct

from vmspawnd.qemu.siphash import derive_vsock_cid_candidates

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
# _IOW(VHOST_VIRTIO=0xAF, 0x60, __u64)
VHOST_VSOCK_SET_GUEST_CID = (1 << 30) | (8 << 16) | (0xAF << 8) | 0x60
RANDOM_ATTEMPTS = 64


def open_vhost_vsock(required: bool | None, device: str = VHOST_VSOCK_DEVICE) -> int | None:
    """The vhost-vsock fd, or None when --vsock=auto and the device cannot be used.

    As vmspawn: absent device or permission problems mean "no vsock" under auto; with
    --vsock=yes they are errors (OSError with the device's name).
    """
    if required is False:
        return None
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if required is None and exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EACCES, errno.EPERM):
            return None
        raise


def _set_cid(fd: int, cid: int) -> None:
    fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))


def cid_candidates(name: str, explicit: int | None, rng: random.Random | None = None) -> list[int]:
    """The CIDs tried in order: the explicit one alone, else 64 hashed then 64 random."""
    if explicit is not None:
        return [explicit]
    rng = rng or random.SystemRandom()
    return derive_vsock_cid_candidates(name) + [3 + rng.randrange(0xFFFFFFFF - 4) for _ in range(RANDOM_ATTEMPTS)]


def assign_cid(fd: int, name: str, explicit: int | None) -> int:
    """Claim a CID on `fd`; only EADDRINUSE moves on to the next candidate."""
    for cid in cid_candidates(name, explicit):
        try:
            _set_cid(fd, cid)
            return cid
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or explicit is not None:
                raise
    raise OSError(errno.EADDRNOTAVAIL, "no free vsock CID found")
