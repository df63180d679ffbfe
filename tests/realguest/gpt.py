# SPDX-License-Identifier: LGPL-2.1-or-later
"""A GUID partition table written byte by byte, for the real guest's disk image.

The host (bookworm) has no sfdisk unless util-linux's fdisk package is installed, and
systemd-repart 252 cannot build images offline; writing the table ourselves needs neither.
The file systems go into the partitions afterwards (mkfs.vfat --offset, mkfs.ext4 -E offset=),
so nothing is ever copied: the image stays sparse.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib
from pathlib import Path

SECTOR = 512
ENTRY_SIZE = 128
ENTRIES = 128
ENTRY_SECTORS = ENTRY_SIZE * ENTRIES // SECTOR  # 32
FIRST_USABLE = 2048  # 1 MiB: the first partition starts aligned

# The Discoverable Partitions Specification's types.
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")


@dataclasses.dataclass(frozen=True)
class Partition:
    """One partition: its type, its PARTUUID, its name and its place in sectors."""

    type: uuid.UUID
    uuid: uuid.UUID
    name: str
    start: int  # first sector
    sectors: int

    @property
    def offset(self) -> int:
        """Where it starts, in bytes."""
        return self.start * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


def layout(sizes: list[tuple[uuid.UUID, uuid.UUID, str, int]]) -> tuple[list[Partition], int]:
    """Place partitions of (type, uuid, name, bytes) one after the other, each MiB-aligned;
    returns them and the disk size in bytes (room for the backup table included)."""
    parts = []
    start = FIRST_USABLE
    for ptype, puuid, name, size in sizes:
        sectors = -(-size // (1024 * 1024)) * 2048
        parts.append(Partition(ptype, puuid, name, start, sectors))
        start += sectors
    total_sectors = start + 2048  # the backup table (33 sectors) fits in the last MiB
    return parts, total_sectors * SECTOR


def write_table(path: Path, disk_size: int, parts: list[Partition], disk_uuid: uuid.UUID) -> None:
    """Create `path` (sparse, `disk_size` bytes) holding a protective MBR and both GPT copies."""
    total = disk_size // SECTOR
    last_usable = total - 1 - ENTRY_SECTORS - 1
    for p in parts:
        if p.start < FIRST_USABLE or p.start + p.sectors - 1 > last_usable:
            raise ValueError(f"partition {p.name} does not fit: {p}")

    entries = bytearray(ENTRY_SIZE * ENTRIES)
    for i, p in enumerate(parts):
        name = p.name.encode("utf-16-le")[:72]
        struct.pack_into(
            "<16s16sQQQ72s", entries, i * ENTRY_SIZE, p.type.bytes_le, p.uuid.bytes_le, p.start, p.start + p.sectors - 1, 0, name
        )
    entries_crc = zlib.crc32(entries)

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        h = bytearray(92)
        struct.pack_into(
            "<8sIIIIQQQQ16sQIII",
            h,
            0,
            b"EFI PART",
            0x10000,
            92,
            0,
            0,
            current,
            backup,
            FIRST_USABLE,
            last_usable,
            disk_uuid.bytes_le,
            entries_lba,
            ENTRIES,
            ENTRY_SIZE,
            entries_crc,
        )
        struct.pack_into("<I", h, 16, zlib.crc32(h))
        return bytes(h)

    mbr = bytearray(SECTOR)
    # One partition of type 0xEE covering the disk (capped at 2 TiB), and the boot signature.
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(total - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"

    with open(path, "wb") as f:
        f.truncate(disk_size)
        f.write(mbr)
        f.seek(1 * SECTOR)
        f.write(header(1, total - 1, 2))
        f.seek(2 * SECTOR)
        f.write(entries)
        f.seek((total - 1 - ENTRY_SECTORS) * SECTOR)
        f.write(entries)
        f.seek((total - 1) * SECTOR)
        f.write(header(total - 1, 1, total - 1 - ENTRY_SECTORS))
