# SPDX-License-Identifier: LGPL-2.1-or-later
"""start_helpers without QEMU: what it starts, what it hands the builder, and that
aclose (or an unwinding start) leaves nothing: no process, socket, key or TPM state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import pytest

from vmspawnd.errors import InvalidSpec
from vmspawnd.helpers import start_helpers
from vmspawnd.spec import BindMount, VmSpec

needs_tools = pytest.mark.skipif(
    shutil.which("swtpm") is None or not os.access("/usr/lib/qemu/virtiofsd", os.X_OK) or os.geteuid() != 0,
    reason="needs root, swtpm and virtiofsd",
)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@needs_tools
def test_helper_set_starts_in_order_and_closes_to_nothing(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    vmdir = tmp_path / "vm"
    vmdir.mkdir(mode=0o700)
    spec = VmSpec(name="hs", linux="/k", tpm=True, tpm_state="off", binds=[BindMount(str(share), "/mnt/s", True)])

    async def run() -> None:
        async with contextlib.AsyncExitStack() as start_stack:
            helpers = await start_helpers(spec, "hs", vmdir, start_stack)
            start_stack.pop_all()  # as a successful Machine.start: the machine closes the set
        assert list(helpers.processes) == ["virtiofsd-mnt0", "swtpm"]  # vmspawn's order
        res = helpers.resources
        assert res.tpm_socket == str(vmdir / "tpm.sock")
        assert [s.tag for s in res.virtiofs] == ["mnt0"]
        assert res.kernel_cmdline_extra == ('systemd.mount-extra="mnt0:/mnt/s:virtiofs:ro"',)
        assert [c.id for c in res.credentials] == [
            "ssh.ephemeral-authorized_keys-all",
            "systemd.unit-dropin.sshd-vsock@.service",
        ]
        assert helpers.ssh_private_key_path == str(vmdir / "hs-ed25519")
        pids = [p.pid for p in helpers.processes.values()]
        await helpers.aclose()
        await helpers.aclose()  # idempotent
        assert not [p for p in pids if running(p)]

    asyncio.run(run())
    assert sorted(p.name for p in vmdir.iterdir()) == ["swtpm.log", "swtpm_setup.log", "virtiofsd-mnt0.log"]


@needs_tools
def test_a_failing_step_unwinds_what_started(tmp_path: Path) -> None:
    vmdir = tmp_path / "vm"
    vmdir.mkdir(mode=0o700)
    share = tmp_path / "share"
    share.mkdir()
    # virtiofsd and swtpm start, then journal forwarding fails (relative output path).
    spec = VmSpec(
        name="hs", linux="/k", tpm=True, tpm_state="off", binds=[BindMount(str(share), "/m")], forward_journal="relative.journal"
    )

    async def run() -> None:
        async with contextlib.AsyncExitStack() as start_stack:
            await start_helpers(spec, "hs", vmdir, start_stack)

    with pytest.raises(InvalidSpec, match="absolute"):
        asyncio.run(run())
    left = sorted(p.name for p in vmdir.iterdir())
    assert left == ["swtpm.log", "swtpm_setup.log", "virtiofsd-mnt0.log"], left
    assert not processes_mentioning(str(tmp_path))  # swtpm (state dir) and virtiofsd (share)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes() and running(int(proc.name)):
                found.append(int(proc.name))
    return found


def test_recorded_helpers_are_stopped_and_their_files_removed(tmp_path: Path) -> None:
    """After a daemon restart the helpers are not our children: stop them from the record."""
    import subprocess

    from vmspawnd.helpers import stop_recorded_helpers
    from vmspawnd.host.process import describe_process
    from vmspawnd.model import ProcessRecord

    vmdir = tmp_path / "vm"
    vmdir.mkdir()
    for name in ("tpm.sock", "sock-0123456789abcdef", "hs-ed25519", "hs-ed25519.pub"):
        (vmdir / name).write_text("")
    (vmdir / "hs-tpm").mkdir()
    helper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        records = {"swtpm": describe_process(helper.pid)}
        stale = ProcessRecord(pid=helper.pid, start_time=records["swtpm"].start_time + 1, boot_id=records["swtpm"].boot_id)

        async def run() -> None:
            await stop_recorded_helpers({"virtiofsd-mnt0": stale}, "hs", vmdir)  # not the same process
            assert helper.poll() is None
            await stop_recorded_helpers(records, "hs", vmdir, str(vmdir / "hs-ed25519"))

        asyncio.run(run())
        assert helper.wait(timeout=10) == -15  # SIGTERM
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    assert list(vmdir.iterdir()) == []
