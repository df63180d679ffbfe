# SPDX-License-Identifier: LGPL-2.1-or-later
"""swtpm: the decision, the state location, the command lines, and a real manufacture."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from pathlib import Path

import pytest

from vmspawnd.errors import InvalidSpec, NotSupported, StartFailed
from vmspawnd.helpers.swtpm import (
    TpmState,
    setup_argv,
    start_swtpm,
    state_location,
    swtpm_argv,
    tpm_wanted,
)
from vmspawnd.spec import VmSpec


def test_decision_follows_259() -> None:
    assert tpm_wanted(VmSpec(name="v", linux="/k"), "x86_64", "/usr/bin/swtpm")
    assert not tpm_wanted(VmSpec(name="v", linux="/k"), "x86_64", None)  # auto without swtpm
    assert not tpm_wanted(VmSpec(name="v", linux="/k", tpm=False), "x86_64", "/usr/bin/swtpm")
    assert not tpm_wanted(VmSpec(name="v", linux="/k"), "riscv64", "/usr/bin/swtpm")
    with pytest.raises(NotSupported):
        tpm_wanted(VmSpec(name="v", linux="/k", tpm=True), "riscv64", "/usr/bin/swtpm")
    with pytest.raises(StartFailed, match="swtpm"):
        tpm_wanted(VmSpec(name="v", linux="/k", tpm=True), "x86_64", None)


def test_state_location(tmp_path: Path) -> None:
    vmdir = tmp_path / "vm"
    assert state_location(VmSpec(name="v", image="/img/disk.raw"), "v", vmdir) == TpmState(Path("/img/disk.raw.tpmstate"), True)
    assert state_location(VmSpec(name="v", directory="/srv/tree/"), "v", vmdir) == TpmState(Path("/srv/tree.tpmstate"), True)
    assert state_location(VmSpec(name="v", linux="/k"), "v", vmdir) == TpmState(vmdir / "v-tpm", False)
    assert state_location(VmSpec(name="v", image="/i", tpm_state="off"), "v", vmdir) == TpmState(vmdir / "v-tpm", False)
    assert state_location(VmSpec(name="v", linux="/k", tpm_state="/s"), "v", vmdir) == TpmState(Path("/s"), True)
    with pytest.raises(InvalidSpec):
        state_location(VmSpec(name="v", linux="/k", tpm_state="rel"), "v", vmdir)


def test_command_lines() -> None:
    assert setup_argv("swtpm_setup", Path("/s"), True) == [
        "swtpm_setup",
        "--tpm-state",
        "/s",
        "--tpm2",
        "--pcr-banks",
        "sha256",
        "--not-overwrite",
        "--profile-name",
        "default-v2",
    ]
    assert "--profile-name" not in setup_argv("swtpm_setup", Path("/s"), False)
    assert swtpm_argv("swtpm", Path("/s"), 5) == [
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        "dir=/s,mode=0600",
        "--ctrl",
        "type=unixio,fd=5",
    ]


@pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")
def test_transient_tpm_is_manufactured_served_and_removed(tmp_path: Path) -> None:
    vmdir = tmp_path / "vm"
    vmdir.mkdir(mode=0o700)
    spec = VmSpec(name="v", linux="/k", tpm=True, tpm_state="off")

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            started = await start_swtpm(spec, "v", vmdir, "x86_64", stack)
            assert started is not None
            child, sock = started
            assert (vmdir / "v-tpm" / "tpm2-00.permall").exists()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(sock))  # swtpm's control channel, served on the daemon's socket
            assert not child.exited
        assert child.exited

    asyncio.run(run())
    assert sorted(p.name for p in vmdir.iterdir()) == ["swtpm.log", "swtpm_setup.log"]
