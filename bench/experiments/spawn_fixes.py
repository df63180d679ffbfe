# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bench-only experiment for Spawn's CPU on the event loop (profile: docs/performance.md):

* registration.pidfd_id: ctypes.util.find_library("c") runs `ldconfig -p` in a subprocess on
  every call; here it is cached (the fix: load libc once per process).
* runtime_dir.write_json_atomic: os.fsync on the event loop at every state change; here the
  fsync is left out, to measure its cost (the fix: none needed on tmpfs /run; on disk, move
  the write to a thread or drop the fsync for runtime state).

`bench/bench.py --daemon-patch=bench/experiments/spawn_fixes.py --only=spawn ...`.
"""

import ctypes.util
import functools
import os

from vmspawnd import runtime_dir

ctypes.util.find_library = functools.cache(ctypes.util.find_library)


class _NoFsyncOs:
    def __getattr__(self, name: str) -> object:
        return (lambda fd: None) if name == "fsync" else getattr(os, name)


runtime_dir.os = _NoFsyncOs()  # type: ignore[assignment]
