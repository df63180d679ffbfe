# SPDX-License-Identifier: LGPL-2.1-or-later
"""qemu/resolve.py's host side: growing an image, loading firmware by path or search,
and the per-VM vmgenid.

Moved from test_qemu_command.py unchanged."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from vmspawnd.errors import InvalidSpec
from vmspawnd.qemu import resolve


def test_grow_image_rounds_and_never_shrinks(tmp_path: Path) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(b"x" * 100)
    assert resolve.grow_image(str(image), 5000) == 8192 and image.stat().st_size == 8192
    assert resolve.grow_image(str(image), 10) == 8192 and image.stat().st_size == 8192
    with pytest.raises(InvalidSpec):
        resolve.grow_image("/dev/null", 4096)


def test_load_firmware_by_path_and_secure_boot_mismatch(tmp_path: Path) -> None:
    desc = "/usr/share/qemu/firmware/60-edk2-x86_64.json"
    if not os.path.exists(desc):
        pytest.skip("no OVMF descriptors")
    fw = resolve.load_firmware("x86_64", desc, None, tmp_path / "vars")
    assert fw.secure_boot is False and fw.vars_path is None and os.path.exists(fw.code_path)
    with pytest.raises(InvalidSpec, match="Secure Boot requested"):
        resolve.load_firmware("x86_64", desc, True, tmp_path / "vars")
    sb = resolve.load_firmware("x86_64", None, True, tmp_path / "vars2")
    assert sb.secure_boot and sb.vars_path and os.stat(sb.vars_path).st_mode & 0o777 == 0o600


def test_vmgenid_is_a_v4_uuid_stable_per_id() -> None:
    a = resolve.derive_vmgenid("0123456789abcdef0123456789abcdef")
    assert a == resolve.derive_vmgenid("0123456789abcdef0123456789abcdef")
    assert uuid.UUID(a).version == 4 and a != resolve.derive_vmgenid("0123456789abcdef0123456789abcdee")
