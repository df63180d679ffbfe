# SPDX-License-Identifier: LGPL-2.1-or-later
"""Boot the test guest with plain QEMU (no vmspawnd) and check its facts.

This guards the guest itself: if these fail, every daemon VM test would
fail for reasons unrelated to the daemon.  Expected values are derived
from the QEMU arguments we pass, never hard-coded in the guest.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
import time
import uuid

import pytest

from tests.guest.build import ensure_guest

QEMU = "qemu-system-x86_64"
SMP = 2
MEMORY_MIB = 256
DISK_BYTES = 8 * 1024 * 1024
DISK_SERIAL = "vmspawndtest0"
MAC = "52:54:00:12:34:56"
CREDENTIAL = b"io.systemd.credential:vmspawnd.test=hello"
BOOT_TIMEOUT = 180
TAG = "VMSPAWND-TEST: "

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed"),
]


@dataclasses.dataclass(frozen=True)
class Boot:
    """What one boot printed, plus the inputs the facts are checked against."""

    lines: list[str]
    marker: str
    machine_uuid: str
    returncode: int
    seconds: float

    def facts(self, key: str) -> list[str]:
        """Values of every ``VMSPAWND-TEST: key value`` line, in order."""
        values = []
        for line in self.lines:
            if not line.startswith(TAG):
                continue
            fact_key, _, value = line[len(TAG) :].partition(" ")
            if fact_key == key:
                values.append(value)
        return values

    def fact(self, key: str) -> str:
        """The single value of ``key``; fails if it is missing or repeated."""
        values = self.facts(key)
        assert len(values) == 1, f"expected one {key!r} fact, got {values}; output:\n" + "\n".join(self.lines)
        return values[0]

    def has(self, key: str) -> bool:
        return bool(self.facts(key))


def _qemu_argv(
    guest_kernel: pathlib.Path, guest_initrd: pathlib.Path, tmp: pathlib.Path, marker: str, machine_uuid: str
) -> list[str]:
    """Plain QEMU boot in poweroff mode, console on virtio to a file."""
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    return [
        QEMU,
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-smp", str(SMP),
        "-m", str(MEMORY_MIB),
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-uuid", machine_uuid,
        "-kernel", str(guest_kernel),
        "-initrd", str(guest_initrd),
        "-append", f"console=hvc0 panic=-1 {marker}",
        "-device", "virtio-serial-pci",
        "-chardev", f"file,id=console,path={tmp / 'console.log'}",
        "-device", "virtconsole,chardev=console",
        "-drive", f"if=none,id=d0,file={disk},format=raw",
        "-device", f"virtio-blk-pci,drive=d0,serial={DISK_SERIAL}",
        "-netdev", "user,id=n0",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
        "-smbios", f"type=11,value={CREDENTIAL.decode()}",
    ]  # fmt: skip


def _run_qemu(argv: list[str]) -> tuple[int, float]:
    """Run QEMU to completion (the guest powers off); never leave it behind."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        returncode = proc.wait(timeout=BOOT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return returncode, time.monotonic() - start


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    """Boot the guest once for all checks in this module (TCG is slow)."""
    guest = ensure_guest()
    tmp = tmp_path_factory.mktemp("guest")
    marker = f"vmspawnd_test.marker={uuid.uuid4().hex}"
    machine_uuid = str(uuid.uuid4())
    returncode, seconds = _run_qemu(_qemu_argv(guest.kernel, guest.initrd, tmp, marker, machine_uuid))
    log = (tmp / "console.log").read_bytes().decode(errors="replace")
    lines = [line.rstrip("\r") for line in log.split("\n")]
    return Boot(lines=lines, marker=marker, machine_uuid=machine_uuid, returncode=returncode, seconds=seconds)


def test_boot_completes_and_powers_off(boot: Boot) -> None:
    assert boot.has("facts-done"), "\n".join(boot.lines)
    assert boot.has("powering-off")
    assert boot.returncode == 0
    print(f"guest boot + poweroff took {boot.seconds:.1f}s")


def test_kernel_cmdline_passed_through(boot: Boot) -> None:
    assert boot.marker in boot.fact("cmdline").split()


def test_cpu_count(boot: Boot) -> None:
    assert int(boot.fact("nproc")) == SMP


def test_memory_size(boot: Boot) -> None:
    # The kernel reserves part of RAM for itself, so MemTotal is below what
    # we gave but must not be below half of it.
    memtotal_kib = int(boot.fact("memtotal-kb"))
    assert MEMORY_MIB * 1024 // 2 < memtotal_kib <= MEMORY_MIB * 1024


def test_virtio_disk(boot: Boot) -> None:
    name, *fields = boot.fact("block").split()
    attributes = dict(field.split("=", 1) for field in fields)
    assert name == "vda"
    assert attributes == {"size": str(DISK_BYTES // 512), "serial": DISK_SERIAL, "ro": "0"}


def test_virtio_net(boot: Boot) -> None:
    assert [value.split()[1] for value in boot.facts("net")] == [MAC]


def test_smbios_credential(boot: Boot) -> None:
    entry, raw_hex = boot.fact("smbios11").split()
    assert entry.startswith("11-")
    raw = bytes.fromhex(raw_hex)
    assert raw[0] == 11  # SMBIOS structure type
    assert CREDENTIAL + b"\0" in raw


def test_machine_uuid(boot: Boot) -> None:
    assert boot.fact("uuid") == boot.machine_uuid


def test_no_tpm_without_tpm_device(boot: Boot) -> None:
    assert boot.fact("tpm") == "none"


def test_only_firmware_specific_modules_fail(boot: Boot) -> None:
    # SeaBIOS boot: efivarfs refuses to load without EFI; anything else
    # failing means the module list or load order is broken.
    assert boot.fact("efi") == "no"
    assert set(boot.facts("modprobe-failed")) <= {"efivarfs"}
