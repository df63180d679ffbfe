# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawn options end to end: one real boot through the daemon carries most of them.

Expectations come from what the guest printed (tests/guest/README.md), compared with
what the test asked for: credentials (binary, NUL included) and --smbios11 strings as
SMBIOS type 11 entries, ARGS and root=PARTUUID= on /proc/cmdline, --uuid, user-mode
networking, the extra drive's serial and size, memory and CPUs.
"""

from __future__ import annotations

import base64
import struct
import uuid
import zlib
from pathlib import Path

import pytest

from tests.guest.build import Guest
from tests.support import Daemon, boot_facts
from vmspawnd.spec.discovery import ROOT_TYPES

pytestmark = pytest.mark.vm

MIB = 1024 * 1024


def write_gpt_image(path: Path, root_uuid: uuid.UUID) -> None:
    """A 4 MiB disk with a GPT holding one x86-64 root partition (written byte by byte)."""
    sector = 512
    entries = bytearray(128 * 128)
    struct.pack_into("<16s16sQQQ", entries, 0, ROOT_TYPES["x86_64"].bytes_le, root_uuid.bytes_le, 2048, 8158, 0)
    header = bytearray(92)
    struct.pack_into(
        "<8sIIIIQQQQ16sQIII",
        header,
        0,
        b"EFI PART",
        0x10000,
        92,
        0,
        0,
        1,
        8191,
        34,
        8158,
        uuid.uuid4().bytes_le,
        2,
        128,
        128,
        zlib.crc32(entries),
    )
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(sector)
        f.write(header)
        f.seek(2 * sector)
        f.write(entries)


def smbios11_strings(facts: dict[str, list[str]]) -> list[bytes]:
    """Decode the guest's `smbios11 11-K HEX` lines: strings after the formatted area."""
    out: list[bytes] = []
    for line in facts.get("smbios11", []):
        raw = bytes.fromhex(line.split()[1])
        out += [s for s in raw[raw[1] :].split(b"\0") if s]
    return out


def test_options_reach_the_guest(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    root_uuid = uuid.uuid4()
    image = tmp_path / "gpt-disk.raw"
    write_gpt_image(image, root_uuid)
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"\0" * (2 * MIB))
    cred_file = tmp_path / "cred.bin"
    cred_file.write_bytes(b"\x00\x01loaded\xff\n")
    machine_uuid = str(uuid.uuid4())
    facts = boot_facts(
        daemon,
        "opts",
        "--kvm=no",
        "--tpm=no",
        "--cpus=2",
        "--ram=300M",
        f"--image={image}",
        f"--linux={guest.kernel}",
        f"--initrd={guest.initrd}",
        f"--extra-drive={extra}",
        "--network-user-mode",
        f"--uuid={machine_uuid}",
        "--set-credential=set.cred:a\\x00b\\nc",
        f"--load-credential=load.cred:{cred_file}",
        "-s",
        "io.test.first=one, with comma",
        "--smbios11=io.test.second=two",
        "vmspawnd_test.mode=wait",
        "marker.word=from-args",
    )

    cmdline = facts["cmdline"][0].split()
    assert cmdline[0] == "console=hvc0"
    assert cmdline[cmdline.index("vmspawnd_test.mode=wait") + 1] == "marker.word=from-args"
    assert f"root=PARTUUID={root_uuid}" in cmdline  # from the image's GPT, via --linux with -i

    strings = smbios11_strings(facts)
    creds = {}
    for s in strings:
        if s.startswith(b"io.systemd.credential.binary:"):
            key, _, b64 = s.partition(b"=")
            creds[key.split(b":", 1)[1].decode()] = base64.b64decode(b64)
    assert creds["set.cred"] == b"a\x00b\nc"
    assert creds["load.cred"] == cred_file.read_bytes()
    assert b"io.test.first=one, with comma" in strings and b"io.test.second=two" in strings

    assert facts["uuid"][0].lower() == machine_uuid
    nets = {tuple(line.split()) for line in facts.get("net", [])}  # the console text may repeat lines
    assert len(nets) == 1, nets  # user-mode networking: one NIC (the default is -nic none)
    blocks = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in facts["block"]]
    by_serial = {b["serial"]: b for b in blocks}
    assert int(by_serial[image.name]["size"]) * 512 == image.stat().st_size
    assert int(by_serial[extra.name]["size"]) * 512 == extra.stat().st_size
    assert int(facts["nproc"][0]) == 2
    assert 0.75 * 300 * MIB < int(facts["memtotal-kb"][0]) * 1024 <= 300 * MIB


def test_directory_boots_kernel_found_through_bls(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    """-D without --linux: the kernel and initrd come from a Type #1 entry in DIR/boot."""
    import shutil

    tree = tmp_path / "tree"
    (tree / "boot" / "loader" / "entries").mkdir(parents=True)
    shutil.copyfile(guest.kernel, tree / "boot" / "vmlinuz-test")
    shutil.copyfile(guest.initrd, tree / "boot" / "initrd-test")
    (tree / "boot" / "loader" / "entries" / "test.conf").write_text("title test\nlinux /vmlinuz-test\ninitrd /initrd-test\n")
    # No -M: the default name is the directory's.
    facts = boot_facts(
        daemon, "tree", "--kvm=no", "--tpm=no", "--ram=256M", "-D", str(tree), "vmspawnd_test.mode=wait", pass_name=False
    )
    cmdline = facts["cmdline"][0].split()
    assert cmdline[:2] == ["console=hvc0", "vmspawnd_test.mode=wait"]
    assert cmdline[2:5] == ["root=root", "rootfstype=virtiofs", "rw"]
