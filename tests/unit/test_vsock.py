# SPDX-License-Identifier: LGPL-2.1-or-later
"""qemu/vsock.py: opening /dev/vhost-vsock (or not), the CID candidates, and moving on
when a CID is taken.

Moved from test_qemu_command.py unchanged."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from vmspawnd.qemu import vsock
from vmspawnd.qemu.siphash import derive_vsock_cid_candidates


def test_vsock_absent_device(tmp_path: Path) -> None:
    missing = str(tmp_path / "vhost-vsock")
    assert vsock.open_vhost_vsock(None, missing) is None
    assert vsock.open_vhost_vsock(False, missing) is None
    with pytest.raises(OSError) as info:
        vsock.open_vhost_vsock(True, missing)
    assert info.value.errno == errno.ENOENT


def test_vsock_candidates() -> None:
    assert vsock.cid_candidates("vm", 77) == [77]
    c = vsock.cid_candidates("vm", None)
    assert c[:64] == derive_vsock_cid_candidates("vm") and len(c) == 128 and all(3 <= x <= 0xFFFFFFFE for x in c)
    assert vsock.VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60


def test_vsock_collision_moves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []

    def fake(fd: int, cid: int) -> None:
        tried.append(cid)
        if len(tried) < 3:
            raise OSError(errno.EADDRINUSE, "in use")

    monkeypatch.setattr(vsock, "_set_cid", fake)
    assert vsock.assign_cid(-1, "vm", None) == derive_vsock_cid_candidates("vm")[2]
    monkeypatch.setattr(vsock, "_set_cid", lambda fd, cid: (_ for _ in ()).throw(OSError(errno.EADDRINUSE, "x")))
    with pytest.raises(OSError):
        vsock.assign_cid(-1, "vm", 99)  # explicit CID: one try, failure fatal
