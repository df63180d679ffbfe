# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon's fingerprint of a confined VM's state.json, kept where no VM can write.

A confined VM's directory belongs to the VM's own id (docs/security.md), so a guest that
escaped into QEMU can rename files there — among them root-owned ones whose bytes it
controls (its log, its console history, its NVRAM) — over state.json. A restarted daemon
adopts what state.json names, and later signals those processes. So every state.json the
daemon writes for such a VM is fingerprinted (SHA-256) in RUNTIME/seals/ID (0700 root), and
at adoption a confined VM's state.json is trusted only if it matches. The seal holds the
digests of the last two writes: the seal is written first, so a crash between the two
writes leaves a state.json the seal still knows.

A VM directory the daemon owns (a user instance, `--qemu-user=root`, VMs of daemons before
this change) needs no seal: nothing but the daemon writes there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vmspawnd.runtime_dir import replace_private_file

SEALS = "seals"


def seal_path(directory: Path) -> Path:
    """RUNTIME/seals/ID for RUNTIME/machines/ID."""
    return directory.parent.parent / SEALS / directory.name


def needs_seal(directory: Path) -> bool:
    """A VM directory somebody else (the VM's id) owns."""
    return os.lstat(directory).st_uid != os.geteuid()


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _known(directory: Path) -> list[str]:
    try:
        return seal_path(directory).read_text().split()
    except FileNotFoundError:
        return []


def seal(directory: Path, content: bytes) -> None:
    """Record `content` (the state.json about to be written) as the daemon's own."""
    if not needs_seal(directory):
        return
    path = seal_path(directory)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    digests = [_digest(content), *_known(directory)[:1]]
    replace_private_file(path, "".join(f"{d}\n" for d in digests).encode())


def trusted_state(directory: Path) -> bool:
    """Whether the daemon may believe the directory's state.json (read without following a link)."""
    if not needs_seal(directory):
        return True
    try:
        fd = os.open(directory / "state.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        content = f.read()
    return _digest(content) in _known(directory)


def remove_seal(directory: Path) -> None:
    """Forget a VM's seal; the seals directory goes with the last one (it is made again
    by the next confined VM), so a daemon without VMs leaves its runtime directory as it was."""
    path = seal_path(directory)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # other VMs' seals, or never made
