# SPDX-License-Identifier: LGPL-2.1-or-later
"""Spawn → Terminate → Remove, twenty times: nothing may accumulate.

Each cycle starts a real QEMU (TCG, 128 MiB; the guest need not boot), stops it and
forgets it. Afterwards the daemon holds the same fds, has the same children (none), the
runtime directory has the same machines/ entries, and no temporary file is left: the
daemon runs with a private TMPDIR that must be empty again, and /tmp and /var/tmp must
have no new entry of the kinds QEMU or the daemon could make.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.build import Guest
from tests.support import Daemon, children_of, daemon_fds, make_runtime_dir, no_leaks, start_daemon, stop_daemon

pytestmark = pytest.mark.vm  # real QEMUs on the test guest (the guest need not finish booting)

MIB = 1024 * 1024
CYCLES = 20
SHARED_TMP = (Path("/tmp"), Path("/var/tmp"))


@pytest.fixture(scope="module")
def tmpdir_daemon() -> Iterator[tuple[Daemon, Path]]:
    """A daemon of our own whose TMPDIR is private, so its temp files can be attributed."""
    runtime = make_runtime_dir("vmspawnd-cycles-")
    private_tmp = Path(tempfile.mkdtemp(prefix="tmpdir-", dir=runtime.parent))
    daemon = start_daemon(runtime, env=dict(os.environ, TMPDIR=str(private_tmp)))
    try:
        yield daemon, private_tmp
    finally:
        stop_daemon(daemon)
        shutil.rmtree(runtime.parent, ignore_errors=True)


def ours(entry: str) -> bool:
    """Shared temp entries the daemon or QEMU could create (other tests' runtime and
    short_tmp dirs aside: a test run beside this one must not fail it)."""
    return entry.startswith(("qemu", "vmspawnd.", "vmspawnd-", "swtpm", "virtiofsd", "tmp")) and not entry.startswith(
        ("vmspawnd-test-", "vmspawnd-cycles-", "vmspawnd-c-", "tmp.")
    )


def shared_tmp_entries() -> set[str]:
    return {f"{d}/{e}" for d in SHARED_TMP for e in os.listdir(d) if ours(e)}


def test_twenty_spawn_terminate_remove_cycles_leak_nothing(tmpdir_daemon: tuple[Daemon, Path], guest: Guest) -> None:
    daemon, private_tmp = tmpdir_daemon
    spec = {
        "kvm": False,
        "ram": 128 * MIB,
        "linux": str(guest.kernel),
        "initrds": [str(guest.initrd)],
        "kernelCmdline": ["vmspawnd_test.mode=wait"],
    }
    daemon.call("List")
    fds_before = daemon_fds(daemon)
    kids_before = children_of(daemon.process.pid)
    machines_before = sorted(os.listdir(daemon.runtime_dir / "machines"))
    runtime_before = sorted(os.listdir(daemon.runtime_dir))
    tmp_before = shared_tmp_entries()
    qemu_pids: set[int] = set()
    with no_leaks(daemon):
        for cycle in range(CYCLES):
            name = f"cycle{cycle}"
            machine = daemon.call("Spawn", {"spec": {**spec, "name": name}})["machine"]
            assert machine["state"] in ("running", "ready"), machine
            pid = machine["qemu"]["pid"]
            assert Path(f"/proc/{pid}").exists()  # QEMU's parent may be a per-VM reaper, not the daemon
            qemu_pids.add(pid)
            ended = daemon.call("Terminate", {"name": name})["machine"]
            assert ended["state"] == "stopped", ended
            daemon.call("Remove", {"name": name})
            assert not Path(str(machine["runtimeDirectory"])).exists()
    assert len(qemu_pids) == CYCLES  # twenty real QEMUs, one after another
    assert [pid for pid in qemu_pids if Path(f"/proc/{pid}").exists()] == []  # gone and reaped, no zombie
    assert daemon.call("List")["machines"] == []
    fds_after = daemon_fds(daemon)
    assert fds_after == fds_before
    assert children_of(daemon.process.pid) == kids_before == []
    assert sorted(os.listdir(daemon.runtime_dir / "machines")) == machines_before
    assert sorted(os.listdir(daemon.runtime_dir)) == runtime_before
    assert os.listdir(private_tmp) == []
    assert shared_tmp_entries() - tmp_before == set()
    print(
        f"\ncycles: {CYCLES}; daemon fds {len(fds_before)} before, {len(fds_after)} after; "
        f"children {len(kids_before)} before and after; machines/ entries {len(machines_before)} before and after"
    )
