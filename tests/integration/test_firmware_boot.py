# SPDX-License-Identifier: LGPL-2.1-or-later
"""A firmware (OVMF) boot of a disk image: a UKI on a FAT image, no --linux.

Without -kernel, vmspawn hands the kernel command line to systemd-stub/systemd-boot as
the two SMBIOS type 11 strings io.systemd.{stub,boot}.kernel-cmdline-extra; the guest
prints every SMBIOS type 11 entry, so the test reads them back from the guest's output.
Debian bookworm's stub (systemd 252) predates reading those strings, so the UKI carries
its own `.cmdline` for the console; the strings are checked as the guest sees them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.guest.build import Guest
from tests.integration.test_options_boot import smbios11_strings
from tests.support import Daemon, boot_facts

pytestmark = pytest.mark.vm

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")


def make_uki_disk(guest: Guest, tmp_path: Path) -> Path:
    """objcopy the stub + kernel + initrd into a UKI, put it on a FAT image as BOOTX64.EFI."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=hvc0 vmspawnd_test.mode=wait")
    osrel = tmp_path / "os-release"
    osrel.write_text("ID=vmspawnd-test\n")
    uki = tmp_path / "uki.efi"
    subprocess.run(
        [
            "objcopy",
            "--add-section",
            f".osrel={osrel}",
            "--change-section-vma",
            ".osrel=0x20000",
            "--add-section",
            f".cmdline={cmdline}",
            "--change-section-vma",
            ".cmdline=0x30000",
            "--add-section",
            f".linux={guest.kernel}",
            "--change-section-vma",
            ".linux=0x2000000",
            "--add-section",
            f".initrd={guest.initrd}",
            "--change-section-vma",
            ".initrd=0x3000000",
            str(STUB),
            str(uki),
        ],
        check=True,
        capture_output=True,
    )
    disk = tmp_path / "esp.raw"
    size_kib = (uki.stat().st_size // 1024) + 8 * 1024
    subprocess.run(["mkfs.vfat", "-C", str(disk), str(size_kib)], check=True, capture_output=True)
    for d in ("::/EFI", "::/EFI/BOOT"):
        subprocess.run(["mmd", "-i", str(disk), d], check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", str(disk), str(uki), "::/EFI/BOOT/BOOTX64.EFI"], check=True, capture_output=True)
    return disk


@pytest.mark.skipif(
    not STUB.exists() or shutil.which("mcopy") is None or shutil.which("mkfs.vfat") is None,
    reason="needs systemd-boot-efi, mtools, dosfstools",
)
def test_firmware_boot_of_uki_sees_cmdline_smbios(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    disk = make_uki_disk(guest, tmp_path)
    facts = boot_facts(daemon, "uki", "--kvm=no", "--tpm=no", "--ram=512M", f"--image={disk}", "marker.word=via-smbios")
    assert facts["efi"][0] == "yes"
    strings = smbios11_strings(facts)
    for key in ("io.systemd.stub.kernel-cmdline-extra", "io.systemd.boot.kernel-cmdline-extra"):
        assert f"{key}=console=hvc0 marker.word=via-smbios".encode() in strings, strings
    blocks = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in facts["block"]]
    assert disk.name in {b["serial"] for b in blocks}
