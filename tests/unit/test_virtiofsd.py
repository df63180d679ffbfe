# SPDX-License-Identifier: LGPL-2.1-or-later
"""virtiofsd: dialect probe, both command lines, 259's kernel words, and a real start/stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from pathlib import Path

import pytest

from vmspawnd.errors import InvalidSpec, NotSupported
from vmspawnd.helpers.virtiofsd import (
    C_VIRTIOFSD,
    Dialect,
    Share,
    Virtiofsd,
    mount_extra_word,
    parse_help,
    plan_shares,
    start_virtiofsd,
    virtiofsd_argv,
)
from vmspawnd.spec import BindMount, VmSpec

RUST = Virtiofsd("/usr/libexec/virtiofsd", Dialect.RUST, readonly=True)
C = Virtiofsd(C_VIRTIOFSD, Dialect.C)
RUST_HELP = "Usage: virtiofsd [OPTIONS]\n  --shared-dir <SHARED_DIR>\n  --fd <FD>\n  --readonly\n"


def test_probe_recognises_both_dialects() -> None:
    assert parse_help("/x", RUST_HELP) == Virtiofsd("/x", Dialect.RUST, readonly=True)
    assert parse_help("/x", RUST_HELP.replace("--readonly", "")) == Virtiofsd("/x", Dialect.RUST, readonly=False)
    c_dialect = parse_help("/x", "usage: ...\n  -o source=PATH   shared directory tree\n")
    assert c_dialect is not None and c_dialect.dialect is Dialect.C
    assert parse_help("/x", "something else") is None


@pytest.mark.skipif(not os.access(C_VIRTIOFSD, os.X_OK), reason="QEMU's C virtiofsd not installed")
def test_probe_recognises_installed_c_virtiofsd() -> None:
    text = subprocess.run([C_VIRTIOFSD, "--help"], capture_output=True, text=True, check=False).stdout
    assert parse_help(C_VIRTIOFSD, text) == C


def test_rust_argv_is_vmspawns() -> None:
    assert virtiofsd_argv(RUST, Share("root", "/srv/root", uid_map=(0, 100000, 65536)), 7) == [
        "/usr/libexec/virtiofsd",
        "--shared-dir",
        "/srv/root",
        "--xattr",
        "--fd",
        "7",
        "--no-announce-submounts",
        "--translate-uid",
        "map:0:100000:65536",
        "--translate-gid",
        "map:0:100000:65536",
    ]
    assert virtiofsd_argv(RUST, Share("mnt0", "/srv/ro", read_only=True), 3)[-1] == "--readonly"
    no_ro = Virtiofsd("/v", Dialect.RUST, readonly=False)
    assert "--readonly" not in virtiofsd_argv(no_ro, Share("mnt0", "/srv/ro", read_only=True), 3)


def test_c_argv_escapes_option_separators() -> None:
    assert virtiofsd_argv(C, Share("mnt0", "/srv/a,b\\c"), 9) == [
        C_VIRTIOFSD,
        "--fd=9",
        "-f",
        "-o",
        "source=/srv/a\\,b\\\\c,cache=auto,xattr",
    ]
    with pytest.raises(NotSupported, match=C_VIRTIOFSD):
        virtiofsd_argv(C, Share("root", "/srv", uid_map=(0, 1, 1)), 3)


def test_mount_extra_word_escapes_like_259() -> None:
    assert mount_extra_word("mnt0", "/mnt/data", False) == 'systemd.mount-extra="mnt0:/mnt/data:virtiofs:rw"'
    assert mount_extra_word("mnt3", '/a:b"c', True) == 'systemd.mount-extra="mnt3:/a\\x3ab\\x22c:virtiofs:ro"'


def test_plan_root_and_binds(tmp_path: Path) -> None:
    spec = VmSpec(name="v", directory="/srv/root", binds=[BindMount("/a", "/mnt/a"), BindMount("/b", "/mnt/b", True)])
    shares, words = plan_shares(spec)
    assert [(s.tag, s.source, s.read_only) for s in shares] == [
        ("root", "/srv/root", False),
        ("mnt0", "/a", False),
        ("mnt1", "/b", True),
    ]
    assert words == [
        "root=root",
        "rootfstype=virtiofs",
        "rw",
        'systemd.mount-extra="mnt0:/mnt/a:virtiofs:rw"',
        'systemd.mount-extra="mnt1:/mnt/b:virtiofs:ro"',
    ]
    shares, _ = plan_shares(VmSpec(name="v", directory="/srv", private_users="100000"))
    assert shares[0].uid_map == (0, 100000, 65536)
    with pytest.raises(InvalidSpec):
        plan_shares(VmSpec(name="v", directory="/srv", private_users="x"))
    with pytest.raises(InvalidSpec):
        plan_shares(VmSpec(name="v", linux="/k", binds=[BindMount("/a", "relative")]))


@pytest.mark.skipif(not os.access(C_VIRTIOFSD, os.X_OK), reason="QEMU's C virtiofsd not installed")
def test_c_virtiofsd_refuses_id_mapping_naming_the_binary(tmp_path: Path) -> None:
    spec = VmSpec(name="v", directory=str(tmp_path), private_users="100000:65536")

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await start_virtiofsd(spec, tmp_path, stack)

    with pytest.raises(InvalidSpec) as info:
        asyncio.run(run())
    assert info.value.field == "privateUsers" and C_VIRTIOFSD in info.value.reason


def test_missing_source_fails_before_anything_starts(tmp_path: Path) -> None:
    spec = VmSpec(name="v", linux="/k", binds=[BindMount(str(tmp_path / "nope"), "/mnt")])

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await start_virtiofsd(spec, tmp_path, stack)

    with pytest.raises(InvalidSpec, match="not a directory"):
        asyncio.run(run())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.access(C_VIRTIOFSD, os.X_OK) or os.geteuid() != 0, reason="needs root and virtiofsd")
def test_virtiofsd_serves_on_the_passed_socket_and_is_reaped(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    vmdir = tmp_path / "vm"
    vmdir.mkdir(mode=0o700)
    spec = VmSpec(name="v", linux="/k", binds=[BindMount(str(share), "/mnt/share")])

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            processes, shares, _ = await start_virtiofsd(spec, vmdir, stack)
            assert list(processes) == ["virtiofsd-mnt0"] and [s.tag for s in shares] == ["mnt0"]
            # The daemon's copy of the listener is closed: only virtiofsd holds it.
            path = shares[0].socket_path
            assert len(os.fsencode(path)) <= 107
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(path)  # accepted by virtiofsd, no polling for the file needed
            child = processes["virtiofsd-mnt0"]
            assert not child.exited
            pid = child.pid
        assert child.exited
        assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        assert not os.path.exists(path)

    asyncio.run(run())
    assert sorted(p.name for p in vmdir.iterdir()) == ["virtiofsd-mnt0.log"]
