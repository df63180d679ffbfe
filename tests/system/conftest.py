# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fixtures of the system tier: Debian containers with systemd as PID 1, vmspawnd installed in
them by scripts/install. See tests/system/README.md.

    system_container   module-scoped, parametrized over SUITES (trixie, forky): one booted
                       container per module and suite, one at a time
    trixie, forky      the same for one suite only
    vmspawnd_installed module-scoped: scripts/install run in system_container, guest copied in
    system_trees       session-scoped: suite -> cached tree (built on first use)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.guest.build import Guest
from tests.system import cgroups, hostenv, trees
from tests.system.container import Bind, Container, boot
from tests.system.deploy import Installation, install_vmspawnd

SUITES = list(trees.SUITES)
# (what, seconds), for the summary at the end of the run: tree builds, boots, installs.
TIMINGS: list[tuple[str, float]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("system tier times")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:7.1f}s  {what}")


@pytest.fixture(scope="session")
def system_tier() -> hostenv.CgroupLayout:
    """The tier's preconditions. Without root it is skipped (with that reason); as root,
    anything missing is a failure, never a skip: CI runs as root and must run the tier."""
    if os.geteuid() != 0:
        pytest.skip("the system tier needs root (debootstrap, mounts, cgroups, systemd-nspawn)")
    missing = hostenv.missing_tools()
    if missing:
        pytest.fail(
            f"the system tier needs {', '.join(missing)} on the host (scripts/test installs debootstrap and systemd-container)",
            pytrace=False,
        )
    layout = hostenv.cgroup_layout()
    # What a killed earlier run left: its processes, cgroups and overlay directories.
    cgroups.reap_stale(layout)
    for workdir in Path(tempfile.gettempdir()).glob("vmspawnd-system-*"):
        if not _owner_alive(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    return layout


def _owner_alive(workdir: Path) -> bool:
    match = re.search(r"-(\d+)-[^-]*$", workdir.name)
    return match is None or Path(f"/proc/{match.group(1)}").exists()


@pytest.fixture(scope="session")
def system_trees(system_tier: hostenv.CgroupLayout) -> Callable[[str], Path]:
    """suite -> its cached tree; built (once per recipe, minutes) on first use."""
    built: dict[str, Path] = {}

    def tree(suite: str) -> Path:
        if suite not in built:
            started = time.monotonic()
            built[suite] = trees.ensure_tree(suite)
            seconds = time.monotonic() - started
            TIMINGS.append((f"{suite} tree {built[suite].name} ({'built' if seconds > 5 else 'cached'})", seconds))
        return built[suite]

    return tree


@pytest.fixture(scope="session")
def container_binds(tmp_path_factory: pytest.TempPathFactory, system_tier: hostenv.CgroupLayout) -> list[Bind]:
    """pip inside works as it does on the host: its configuration as /etc/pip.conf, the local
    indexes and wheel directories it names, and a wheel cache shared by all containers (so a
    repeated install downloads nothing)."""
    pip = hostenv.pip_setup()
    conf = tmp_path_factory.mktemp("system") / "pip.conf"
    conf.write_text(pip.conf)
    cache = trees.trees_root() / "pip-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return [Bind(conf, "/etc/pip.conf"), *(Bind(p) for p in pip.paths), Bind(cache, "/root/.cache/pip", read_only=False)]


@contextlib.contextmanager
def booted(suite: str, tree: Path, binds: list[Bind]) -> Iterator[Container]:
    container = boot(tree, f"vmspawnd-{suite}", suite=suite, binds=binds)
    TIMINGS.append((f"{suite} boot to {container.state}", container.boot_seconds))
    try:
        yield container
    finally:
        started = time.monotonic()
        container.poweroff()
        TIMINGS.append((f"{suite} poweroff", time.monotonic() - started))


@pytest.fixture(scope="module", params=SUITES)
def system_container(
    request: pytest.FixtureRequest, system_trees: Callable[[str], Path], container_binds: list[Bind]
) -> Iterator[Container]:
    """A booted container per module and suite. pytest runs a module's tests for one suite,
    powers that container off, then boots the next: never two at a time."""
    with booted(request.param, system_trees(request.param), container_binds) as container:
        yield container


@pytest.fixture(scope="module")
def trixie(system_trees: Callable[[str], Path], container_binds: list[Bind]) -> Iterator[Container]:
    with booted("trixie", system_trees("trixie"), container_binds) as container:
        yield container


@pytest.fixture(scope="module")
def forky(system_trees: Callable[[str], Path], container_binds: list[Bind]) -> Iterator[Container]:
    with booted("forky", system_trees("forky"), container_binds) as container:
        yield container


@pytest.fixture(scope="module")
def vmspawnd_installed(system_container: Container, guest: Guest) -> Installation:
    """vmspawnd installed in `system_container` by scripts/install, the test guest beside it."""
    installation = install_vmspawnd(system_container, guest.kernel, guest.initrd)
    TIMINGS.append((f"{system_container.suite} scripts/install", installation.seconds))
    return installation
