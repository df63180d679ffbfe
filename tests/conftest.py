# SPDX-License-Identifier: LGPL-2.1-or-later
"""Shared fixtures: the test guest, a daemon per module, and a zombie check after all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support import Daemon, make_runtime_dir, start_daemon, stop_daemon, zombies

if TYPE_CHECKING:
    from tests.guest.build import Guest


@pytest.fixture(scope="session")
def guest() -> Guest:
    from tests.guest.build import ensure_guest

    return ensure_guest()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    runtime = make_runtime_dir()
    d = start_daemon(runtime)
    try:
        yield d
    finally:
        stop_daemon(d)
        shutil.rmtree(runtime.parent, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_zombies_at_end() -> Iterator[None]:
    """Nothing the tests started may be left unreaped: not by us, not orphaned to PID 1
    (which does not reap here). Other processes' zombies on a shared machine don't count."""
    parents = {os.getpid(), 1}
    before = set(zombies(parents))
    yield
    left = set(zombies(parents)) - before
    assert not left, f"zombie processes left behind: {sorted(left)}"
