# SPDX-License-Identifier: LGPL-2.1-or-later
"""Shared fixtures: the test guest, a daemon per module, and a zombie check after all;
and the check that every test using the guest is marked for its tier (tests/README.md)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support import Daemon, make_runtime_dir, start_daemon, stop_daemon, zombies

if TYPE_CHECKING:
    from tests.guest.build import Guest

GUEST_MARKERS = {"vm", "qemu", "system"}


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The test guest (tests/guest), built on first use: only for tests marked vm or qemu."""
    from tests.guest.build import ensure_guest

    return ensure_guest()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the guest must be marked, or a bare `pytest` (the fast tier, which
    deselects vm, qemu and system) would build the guest and boot QEMU after all. Runs
    before the -m deselection, so it sees every collected test."""
    unmarked = [
        item.nodeid
        for item in items
        if "guest" in getattr(item, "fixturenames", ()) and not GUEST_MARKERS & {m.name for m in item.iter_markers()}
    ]
    if unmarked:
        raise pytest.UsageError("tests that use the guest fixture must be marked vm, qemu or system: " + ", ".join(unmarked))


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
