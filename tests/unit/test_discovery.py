# SPDX-License-Identifier: LGPL-2.1-or-later
"""spec/discovery.py against real files: GPT root discovery (also against sfdisk's view)
and boot-entry lookup in a directory tree (BLS entries, UKIs, loader.conf's default).

Moved from test_qemu_command.py unchanged."""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from pathlib import Path

import pytest

from vmspawnd.spec import discovery


def make_gpt(parts: list[tuple[uuid.UUID, uuid.UUID, int]], sector: int = 512) -> bytes:
    """A minimal GPT disk image: protective MBR, header at LBA 1, 128 entries at LBA 2."""
    entries = bytearray(128 * 128)
    for i, (type_guid, unique, attrs) in enumerate(parts):
        struct.pack_into("<16s16sQQQ", entries, i * 128, type_guid.bytes_le, unique.bytes_le, 34 + i, 34 + i, attrs)
        entries[i * 128 + 56 : i * 128 + 56 + 8] = "root".encode("utf-16-le")
    header = bytearray(92)
    struct.pack_into(
        "<8sIIIIQQQQ16sQIII",
        header,
        0,
        b"EFI PART",
        0x10000,
        92,
        0,
        0,
        1,
        63,
        34,
        62,
        uuid.uuid4().bytes_le,
        2,
        128,
        128,
        zlib.crc32(entries),
    )
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    disk = bytearray(64 * sector)
    disk[sector : sector + 92] = header
    disk[2 * sector : 2 * sector + len(entries)] = entries
    return bytes(disk)


def test_gpt_root_partuuid(tmp_path: Path) -> None:
    root_id = uuid.uuid4()
    esp = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
    image = tmp_path / "disk.raw"
    image.write_bytes(make_gpt([(esp, uuid.uuid4(), 0), (discovery.ROOT_TYPES["x86_64"], root_id, 0)]))
    assert discovery.image_root_word(str(image), "x86_64") == f"root=PARTUUID={root_id}"


def test_gpt_usr_only_and_no_auto(tmp_path: Path) -> None:
    usr_id = uuid.uuid4()
    image = tmp_path / "disk.raw"
    image.write_bytes(
        make_gpt(
            [
                (discovery.ROOT_TYPES["x86_64"], uuid.uuid4(), discovery.GPT_FLAG_NO_AUTO),
                (discovery.USR_TYPES["x86_64"], usr_id, 0),
            ]
        )
    )
    assert discovery.image_root_word(str(image), "x86_64") == f"mount.usr=PARTUUID={usr_id}"


def test_gpt_missing(tmp_path: Path) -> None:
    image = tmp_path / "plain.raw"
    image.write_bytes(b"\0" * 8192)
    with pytest.raises(LookupError, match="no GUID partition table"):
        discovery.image_root_word(str(image), "x86_64")
    image.write_bytes(make_gpt([(uuid.uuid4(), uuid.uuid4(), 0)]))
    with pytest.raises(LookupError, match="root= or mount.usr="):
        discovery.image_root_word(str(image), "x86_64")


def test_gpt_parsed_like_sfdisk(tmp_path: Path) -> None:
    import shutil
    import subprocess

    sfdisk = shutil.which("sfdisk") or ("/sbin/sfdisk" if os.path.exists("/sbin/sfdisk") else None)
    if sfdisk is None:
        pytest.skip("sfdisk not installed")
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    layout = f"label: gpt\nsize=2MiB, type={discovery.ROOT_TYPES['x86_64']}, name=root\n"
    subprocess.run([sfdisk, "-q", str(image)], input=layout.encode(), check=True, capture_output=True)
    out = subprocess.run([sfdisk, "--part-uuid", str(image), "1"], check=True, capture_output=True, text=True).stdout
    assert discovery.image_root_word(str(image), "x86_64") == f"root=PARTUUID={out.strip().lower()}"


def test_bls_default_entry_then_uki_then_conf(tmp_path: Path) -> None:
    (tmp_path / "boot" / "loader" / "entries").mkdir(parents=True)
    (tmp_path / "boot" / "loader" / "entries" / "b-6.1.conf").write_text("linux /vmlinuz-6.1\ninitrd /i1 /i2\ninitrd /i3\n")
    entry = discovery.find_boot_entry(str(tmp_path))
    assert entry.kernel == f"{tmp_path}/boot/vmlinuz-6.1" and entry.initrds == tuple(
        f"{tmp_path}/boot/{i}" for i in ("i1", "i2", "i3")
    )
    (tmp_path / "efi" / "EFI" / "Linux").mkdir(parents=True)
    for v in ("6.2", "6.10"):
        (tmp_path / "efi" / "EFI" / "Linux" / f"linux-{v}.efi").write_bytes(b"")
    assert discovery.find_boot_entry(str(tmp_path)).kernel.endswith("linux-6.10.efi")
    (tmp_path / "efi" / "loader").mkdir()
    (tmp_path / "efi" / "loader" / "loader.conf").write_text("timeout 3\ndefault b-*.conf\n")
    assert discovery.find_boot_entry(str(tmp_path)).id == "b-6.1.conf"
