# SPDX-License-Identifier: LGPL-2.1-or-later
"""Putting vmspawnd into a test container the way README.md tells a user to: the checkout
under test copied in, then `scripts/install` run in it as root; and the test guest beside it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.system.container import Container

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKOUT_DIR = "/root/vmspawnd"
GUEST_DIR = "/var/lib/vmspawnd-test"
INSTALL_TIMEOUT = 900.0  # a cold pip cache downloads the dependencies (a few MB)
# What a copy of the checkout never needs (the fallback without git only).
_NOT_SOURCE = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}


@dataclasses.dataclass(frozen=True)
class Installation:
    """vmspawnd installed in a container, and where the test guest is inside."""

    checkout: str  # the copied checkout inside (scripts/install ran from it)
    kernel: str  # the test guest, inside
    initrd: str
    output: str  # what scripts/install printed (stdout and stderr)
    seconds: float  # how long scripts/install took


def checkout_files(repo: Path = REPO_ROOT) -> list[str]:
    """The checkout under test, relative to `repo`: tracked files and untracked ones that are
    not ignored, as they are in the working tree (uncommitted changes included)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "-c", "-o", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
    except (OSError, subprocess.CalledProcessError):
        names = []
        for directory, dirs, files in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in _NOT_SOURCE and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(directory, f), repo) for f in files]
    # Tracked but deleted in the working tree: not part of what is under test.
    return [n for n in names if os.path.lexists(repo / n)]


def copy_checkout(container: Container, repo: Path = REPO_ROOT, dest: str = CHECKOUT_DIR) -> None:
    container.run(["rm", "-rf", dest])
    container.copy_in(repo, dest, checkout_files(repo))


def copy_guest(container: Container, kernel: Path, initrd: Path, dest: str = GUEST_DIR) -> tuple[str, str]:
    """The test guest's kernel and initrd, inside (the daemon opens them there)."""
    inside = (f"{dest}/vmlinuz", f"{dest}/initrd.img")
    container.copy_in(kernel, inside[0])
    container.copy_in(initrd, inside[1])
    return inside


def install_vmspawnd(
    container: Container, kernel: Path, initrd: Path, *, args: Sequence[str] = (), repo: Path = REPO_ROOT
) -> Installation:
    """Copy the checkout in and run `scripts/install ARGS` from it as root — as a transient
    service, so it runs as an administrator's root shell would: a clean environment, systemd
    as PID 1 — then copy the test guest in. Raises CommandFailed with the script's output if
    the install fails."""
    copy_checkout(container, repo)
    started = time.monotonic()
    result = container.unit_run(" ".join(["scripts/install", *args]), cwd=CHECKOUT_DIR, timeout=INSTALL_TIMEOUT)
    seconds = time.monotonic() - started
    guest_kernel, guest_initrd = copy_guest(container, kernel, initrd)
    return Installation(
        checkout=CHECKOUT_DIR, kernel=guest_kernel, initrd=guest_initrd, output=result.stdout + result.stderr, seconds=seconds
    )
