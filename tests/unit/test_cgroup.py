# SPDX-License-Identifier: LGPL-2.1-or-later
"""Which unit a process runs in, from /proc/PID/cgroup (for --keep-unit)."""

from __future__ import annotations

import os

import pytest

from vmspawnd.host.cgroup import cgroup_path, unit_from_cgroup, unit_of_pid

HYBRID = """12:pids:/system.slice/foo.service
1:name=systemd:/system.slice/foo.service
0::/system.slice/foo.service
"""
LEGACY = """4:memory:/user.slice
1:name=systemd:/user.slice/user-1000.slice/session-3.scope
"""


def test_cgroup_path_prefers_the_unified_hierarchy() -> None:
    assert cgroup_path("0::/system.slice/a.service\n") == "/system.slice/a.service"
    assert cgroup_path(HYBRID) == "/system.slice/foo.service"
    assert cgroup_path(LEGACY) == "/user.slice/user-1000.slice/session-3.scope"
    assert cgroup_path("4:memory:/x\n") is None


@pytest.mark.parametrize(
    ("path", "user", "unit"),
    [
        ("/system.slice/foo.service", False, "foo.service"),
        ("/system.slice/foo.service/payload", False, "foo.service"),  # a delegated sub-cgroup
        ("/machine.slice/vm1.scope", False, "vm1.scope"),
        ("/user.slice/user-1000.slice/session-3.scope", False, "session-3.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/run-u5.service", False, "user@1000.service"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/run-u5.service", True, "run-u5.service"),
        ("/user.slice/user-1000.slice/session-3.scope", True, None),
        ("/", False, None),
        ("/init.scope", False, "init.scope"),
        ("/system.slice", False, None),
        ("/some/odd/path", False, None),
    ],
)
def test_unit_from_cgroup(path: str, user: bool, unit: str | None) -> None:
    assert unit_from_cgroup(path, user) == unit


def test_unit_of_pid_for_gone_or_invalid_pids() -> None:
    assert unit_of_pid(0) is None
    assert unit_of_pid(-5) is None
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        path = cgroup_path(f.read())
    assert unit_of_pid(os.getpid()) == (unit_from_cgroup(path) if path else None)
