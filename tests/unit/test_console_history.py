# SPDX-License-Identifier: LGPL-2.1-or-later
"""Console history: QEMU appends to console.log, the daemon rotates it (copytruncate).

A second O_APPEND descriptor plays QEMU's part: it is opened once and never reopened,
exactly as QEMU holds its `logfile=`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmspawnd.qemu.console import History, read_history


def qemu_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND)


def test_created_private_and_empty(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    History.create(log)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert log.read_bytes() == b""


def test_rotation_keeps_everything_under_the_cap_and_qemu_writes_on(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    History.create(log)
    history = History(log, cap=100)
    qemu = qemu_log(log)
    try:
        os.write(qemu, b"a" * 60)
        history.rotate_if_full()
        assert not history.rotated.exists()  # under the cap: nothing to do
        os.write(qemu, b"b" * 60)
        history.rotate_if_full()
        assert history.rotated.read_bytes() == b"a" * 40 + b"b" * 60  # the newest 100 bytes
        assert log.read_bytes() == b""
        os.write(qemu, b"after")  # O_APPEND: lands at the new end, no hole
        assert log.read_bytes() == b"after"
        assert read_history(log) == b"a" * 40 + b"b" * 60 + b"after"
        assert read_history(log, 7) == b"b" * 2 + b"after"
        assert stat.S_IMODE(history.rotated.stat().st_mode) == 0o600
    finally:
        os.close(qemu)
        history.close()


def test_backlog_after_a_daemon_gap_is_cut_to_the_cap(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    History.create(log)
    qemu = qemu_log(log)
    os.write(qemu, bytes(range(256)) * 1000)  # what QEMU logged while no daemon ran
    history = History(log, cap=1000)
    try:
        history.rotate_if_full()
        assert history.rotated.read_bytes() == (bytes(range(256)) * 1000)[-1000:]
        assert log.stat().st_size == 0
    finally:
        os.close(qemu)
        history.close()


def test_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 10)
    log = tmp_path / "console.log"
    log.symlink_to(target)
    with pytest.raises(OSError):
        History.create(log)
    with pytest.raises(OSError):
        History(log)
