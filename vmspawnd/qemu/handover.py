# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon opens, a confined QEMU receives (system instance, docs/security.md).

A confined QEMU runs as the VM's own uid and cannot open the caller's paths. The daemon,
which checked them for the caller, opens them and passes the fds:

- disk images, extra drives, firmware code and the NVRAM copy: `-add-fd` + /dev/fdset/N.
  QEMU dups the set's fd whose access mode matches each open, and its block layer opens
  a writable file read-only as well (probing, locking), so a writable file's set holds a
  read-write and a read-only fd (as QEMU's own -add-fd example); a read-only file's, one.
  QEMU's own image locking is off for these (`file.locking=off`): after a migration (a
  snapshot) QEMU 7.2 cannot take its locks back through a set's fds. The daemon locks
  instead: an OFD write lock on the read-write fd it passes, held for as long as QEMU
  holds that fd (its life), which conflicts with the byte locks any other QEMU takes on
  the file just as QEMU's own would ("in use" instead of two writers).
- the TAP device: created here (TUNSETIFF needs CAP_NET_ADMIN) and passed as `tap,fd=`.

QEMU 7.2 reads `-kernel` and `-initrd` with fopen/g_file_get_contents (no qemu_open, so no
/dev/fdset; a /proc/self/fd/N path would re-check the inode's permissions on open): they are
copied into the VM's directory, owned by the VM. The SMBIOS payloads and the merged initrd
are written there by the daemon anyway and handed over the same way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

from vmspawnd.host.identity import VmIdentity, hand_over
from vmspawnd.qemu.resources import Firmware
from vmspawnd.spec import VmSpec

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class FileInUse(OSError):
    """Another process holds a lock on a file QEMU would write."""


def open_for_qemu(path: str, writable: bool) -> tuple[int, ...]:
    """The fds of `path`'s fdset: read-write and read-only for what QEMU writes (the
    read-write one write-locked), read-only otherwise."""
    read_only = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if not writable:
        return (read_only,)
    read_write = -1
    try:
        read_write = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        lock_for_writing(read_write, path)
        return (read_write, read_only)
    except BaseException:
        close_all(fd for fd in (read_write, read_only) if fd >= 0)
        raise


def lock_for_writing(fd: int, path: str) -> None:
    """An OFD write lock on the whole file: it belongs to the open file description, so it
    travels with the fd into QEMU and goes when QEMU's last copy closes."""
    flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # struct flock, whole file
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise FileInUse(exc.errno, "in use by another process (it holds a lock on the file)", path) from None
        raise


def open_files(spec: VmSpec, firmware: Firmware | None, image_writable: bool = True) -> dict[str, tuple[int, ...]]:
    """Every file QEMU opens through the block layer, opened by the daemon (path → its fds).

    `image_writable` False: the image is a clone's frozen base, read through its overlay.

    On a failure the fds opened so far are closed before the error propagates.
    """
    wanted: list[tuple[str, bool]] = []
    if firmware is not None:
        wanted.append((firmware.code_path, False))
        if firmware.secure_boot and firmware.vars_path is not None:
            wanted.append((firmware.vars_path, True))
    if spec.image:
        wanted.append((spec.image, image_writable))
    wanted += [(path, True) for path in spec.extra_drives]
    opened: dict[str, tuple[int, ...]] = {}
    try:
        for path, writable in wanted:
            if path not in opened:
                opened[path] = open_for_qemu(path, writable)
    except BaseException:
        close_all(fd for fds in opened.values() for fd in fds)
        raise
    return opened


def close_all(fds: Iterable[int]) -> None:
    for fd in list(fds):
        os.close(fd)


def copy_for_vm(source: str, target: Path, identity: VmIdentity) -> str:
    """A private copy QEMU can read (kernel, initrd): 0400, owned by the VM, never through a symlink."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 1024 * 1024)
    hand_over(target, identity)
    return str(target)


def open_tap(ifname: str) -> int:
    """Create TAP device `ifname` as QEMU would (tap,ifname=…: vnet header, no packet info)
    and return its fd; the device goes when the last fd does, as with QEMU's own."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, request)
    except BaseException:
        os.close(fd)
        raise
    return fd


def hand_over_files(paths: list[Path], identity: VmIdentity) -> None:
    """Sockets QEMU connects to, files it reads or appends to: the VM's."""
    for path in paths:
        hand_over(path, identity)
