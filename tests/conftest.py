# SPDX-License-Identifier: LGPL-2.1-or-later
"""Shared fixtures: the test guest, a daemon per module, and a zombie check after all."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.support import Daemon, make_runtime_dir, start_daemon, stop_daemon, zombies


@pytest.fixture(scope="session")
def guest():  # type: ignore[no-untyped-def]
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
    before = set(zombies())
    yield
    left = set(zombies()) - before
    assert not left, f"zombie processes left behind: {sorted(left)}"
