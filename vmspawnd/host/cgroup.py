# SPDX-License-Identifier: LGPL-2.1-or-later
"""Which systemd unit a process runs in, read from its cgroup (as sd_pid_get_unit()).

Used for `--keep-unit`: the VM's processes join the unit of the client that asked, so
the caller is known from SO_PEERCRED and its unit from /proc/PID/cgroup.
"""

from __future__ import annotations

import os

_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".device", ".target", ".timer", ".path")


def cgroup_path(cgroup_file: str) -> str | None:
    """The unified (cgroup v2) path from /proc/PID/cgroup's text; on a hybrid or legacy
    host, systemd's own named hierarchy, which mirrors it."""
    named = None
    for line in cgroup_file.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
        if controllers == "name=systemd":
            named = path
    return named


def unit_from_cgroup(path: str, user: bool = False) -> str | None:
    """systemd's cg_path_get_unit() (or cg_path_get_user_unit() with `user`): the first
    unit below the slices — for a user unit, below the user's manager, user@UID.service."""
    components = [part for part in path.split("/") if part]
    if user:
        managers = [i for i, part in enumerate(components) if part.startswith("user@") and part.endswith(".service")]
        if not managers:
            return None
        components = components[managers[0] + 1 :]
    for part in components:
        if part.endswith(".slice"):
            continue
        return part if part.endswith(_UNIT_SUFFIXES) else None
    return None


def unit_of_pid(pid: int, user: bool = False) -> str | None:
    """The unit `pid` runs in, None if it is in none (or is gone, or not visible here)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            path = cgroup_path(f.read())
    except OSError:
        return None
    return unit_from_cgroup(path, user) if path is not None else None


def own_unit(user: bool = False) -> str | None:
    return unit_of_pid(os.getpid(), user)
