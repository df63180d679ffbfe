# SPDX-License-Identifier: LGPL-2.1-or-later
"""The real guest: a Debian trixie system with systemd as PID 1, built from Debian's packages
by the test harness, cached outside the repository, and bootable the three ways users boot
OS images with vmspawn.

One build gives:

* ``tree/``: the root directory, for ``-D`` (virtiofs root). Its ``/boot`` holds the kernel
  and an initramfs-tools initrd, and a Boot Loader Specification entry
  (``/boot/loader/entries/debian.conf``) through which vmspawn finds both.
* ``vmlinuz``, ``initrd.img``: the same kernel and initrd, for ``--linux``/``--initrd``.
* ``disk.raw``: a GPT disk image (sparse) with an ESP (systemd-boot as the removable-media
  boot loader, a UKI made by ukify in ``/EFI/Linux``) and a root-x86-64 partition holding
  the tree (ext4, made with ``mkfs.ext4 -d``: no mounts, no loop devices).

The guest has a console getty on hvc0 (systemd's getty generator, from ``console=hvc0``),
root with an empty password, and ``vmspawnd-report.service`` (report.sh), which prints what
the guest received on the console once the boot has finished.

Why trixie: it is the stable release, so the recipe does not break with package transitions;
its kernel builds virtio-pci, virtio-console, virtiofs and the TPM TIS driver in, so the
initrd only needs virtio-blk and ext4 (``MODULES=list``: a 10 MB initrd instead of 37 MB).

Like the system tier's trees (tests/system/trees.py, whose helpers this reuses), the build
is keyed by a hash of its recipe and of this directory's files, built beside its final place
and renamed into place when whole, one builder at a time (a lock file), every chroot in a
private mount namespace. The harness boots copies; the cache is never booted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

from tests.realguest import gpt
from tests.system import hostenv
from tests.system.trees import (
    POLICY_RC_D,
    UNSAFE_IO,
    TreeBuildError,
    _locked,
    _mark_used,
    _run,
    _write,
    in_tree,
    trees_root,
)

HERE = Path(__file__).resolve().parent
REPORT_SCRIPT = HERE / "report.sh"
SUITE = "trixie"
NAME = "realguest"

# --variant=minbase brings apt, dpkg and the essential set; --include what makes it boot as a
# system: systemd as PID 1 (systemd-sysv), dbus (logind needs it for the power button), udev.
INCLUDE = ("systemd", "systemd-sysv", "dbus", "udev")
PACKAGES = (
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",  # the initrd's compression (initramfs-tools falls back to gzip without it)
    "systemd-boot-efi",  # systemd-boot and systemd-stub
    "systemd-ukify",  # builds the UKI (python3, python3-pefile)
)
# The initrd's modules (MODULES=list): what trixie's kernel has as modules among what the root
# needs: the virtio disk and its file system. virtio-pci, virtiofs, virtio-console are built in.
INITRD_MODULES = ("virtio_blk", "ext4")
# A headless VM has no VGA: tty1's getty would talk to nobody.
MASKED_UNITS = ("getty@tty1.service",)

REPORT_UNIT = """\
[Unit]
Description=Report what the VM received (vmspawnd tests)

[Service]
# Not a oneshot: the script waits for the boot to finish, which a oneshot would hold up.
Type=exec
ExecStart=/usr/local/lib/vmspawnd-report
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

ESP_SIZE = 64 * 1024 * 1024
ROOT_SLACK = 512 * 1024 * 1024  # free space in the root file system for the boots' writes


@dataclasses.dataclass(frozen=True)
class RealGuest:
    """A built guest; every path is in the cache and must not be booted in place."""

    directory: Path
    kernel_version: str
    systemd_version: int
    root_partuuid: str
    build_seconds: float

    @property
    def tree(self) -> Path:
        return self.directory / "tree"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.raw"

    @property
    def uki(self) -> Path:
        return self.directory / "uki.efi"


def recipe() -> dict[str, object]:
    """Everything that shapes the guest; its hash names the cache entry."""
    return {
        "suite": SUITE,
        "include": list(INCLUDE),
        "packages": list(PACKAGES),
        "initrd_modules": list(INITRD_MODULES),
        "masked": list(MASKED_UNITS),
        "report_unit": REPORT_UNIT,
        "files": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (Path(__file__).resolve(), REPORT_SCRIPT, HERE / "gpt.py")
        },
    }


def guests_root() -> Path:
    return trees_root().parent / "realguest"


def _load(directory: Path) -> RealGuest | None:
    info = directory / "info.json"
    if not info.is_file():
        return None
    data = json.loads(info.read_text())
    return RealGuest(directory, data["kernel_version"], data["systemd_version"], data["root_partuuid"], data["build_seconds"])


def ensure_real_guest() -> RealGuest:
    """The cached guest for the current recipe, built first if there is none."""
    spec = recipe()
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    root = guests_root()
    final = root / f"{SUITE}-{key}"
    if (guest := _load(final)) is not None:
        _mark_used(final)
        return guest
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if (guest := _load(final)) is not None:
            _mark_used(final)
            return guest
        for stale in root.glob(".build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        _prune(root, keep=final.name)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        work.chmod(0o755)
        log_path = root / f"{final.name}.log"
        try:
            with open(log_path, "w") as log:
                _build(spec, work, log)
            (root / f"{final.name}.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
            os.rename(work, final)
            _mark_used(final)
        except BaseException as exc:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:]) if log_path.exists() else ""
            if isinstance(exc, Exception):
                raise TreeBuildError(f"building the real guest failed: {exc}\n--- {log_path} ---\n{tail}") from exc
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    guest = _load(final)
    assert guest is not None
    return guest


# Another recipe's guest (older commit, other checkout) is removed when a new one is built; the
# busybox guest and the system tier's trees live elsewhere in the cache. Each is ~1 GB.
def _prune(root: Path, keep: str) -> None:
    for old in root.glob(f"{SUITE}-*"):
        if old.name.split(".")[0] == keep:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # its .used, .json, or the .log of a build that failed
            old.unlink(missing_ok=True)


def _build(spec: dict[str, object], work: Path, log: IO[str]) -> None:
    started = time.monotonic()

    def step(what: str) -> None:
        print(f"=== {time.monotonic() - started:6.1f}s {what}", file=log, flush=True)

    tree = work / "tree"
    mirror = hostenv.debian_mirror()
    step(f"debootstrap {SUITE} from {mirror}")
    _run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(INCLUDE)}",
            SUITE,
            str(tree),
            mirror,
        ],
        log,
        what="debootstrap",
    )
    _write(tree / POLICY_RC_D, "#!/bin/sh\nexit 101\n", mode=0o755)
    _write(tree / UNSAFE_IO, "force-unsafe-io\n")
    shutil.copy(Path("/etc/resolv.conf").resolve(), tree / "etc/resolv.conf")

    # initramfs-tools reads its configuration when the kernel's postinst builds the initrd.
    _write(tree / "etc/initramfs-tools/conf.d/vmspawnd-tests.conf", "MODULES=list\nCOMPRESS=zstd\n")
    with open(tree / "etc/initramfs-tools/modules", "a") as modules:
        modules.write("".join(f"{m}\n" for m in INITRD_MODULES))

    step("apt-get install")
    in_tree(tree, ["apt-get", "-q", "update"], log)
    in_tree(tree, ["apt-get", "-q", "-y", "install", "--no-install-recommends", *PACKAGES], log)
    # zstd arrives in the same transaction as the kernel: make sure the initrd uses it.
    in_tree(tree, ["update-initramfs", "-u", "-k", "all"], log)

    step("configure")
    _write(tree / "etc/hostname", f"{NAME}\n")
    _write(tree / "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {NAME}\n")
    # A machine-id, so that the first boot is not a "first boot" (systemd-firstboot would
    # prompt on the console); the copies booted share it, which is harmless one VM at a time.
    _write(tree / "etc/machine-id", uuid.uuid4().hex + "\n", mode=0o444)
    _write(tree / "usr/local/lib/vmspawnd-report", REPORT_SCRIPT.read_text(), mode=0o755)
    _write(tree / "etc/systemd/system/vmspawnd-report.service", REPORT_UNIT)
    in_tree(tree, ["systemctl", "enable", "vmspawnd-report.service"], log)
    in_tree(tree, ["systemctl", "mask", *MASKED_UNITS], log)
    in_tree(tree, ["systemctl", "set-default", "multi-user.target"], log)
    # Root logs in on the console getty without a password (pam_unix's nullok).
    in_tree(tree, ["passwd", "-d", "root"], log)

    kernel_version = _kernel_version(tree)
    systemd_version = _systemd_version(tree, log)
    boot = tree / "boot"
    _write(
        boot / "loader/entries/debian.conf",
        f"title Debian GNU/Linux {SUITE}\nversion {kernel_version}\n"
        f"linux /vmlinuz-{kernel_version}\ninitrd /initrd.img-{kernel_version}\n",
    )
    shutil.copyfile(boot / f"vmlinuz-{kernel_version}", work / "vmlinuz")
    shutil.copyfile(boot / f"initrd.img-{kernel_version}", work / "initrd.img")

    root_partuuid = uuid.uuid4()
    step("UKI (ukify)")
    # The UKI names its root: initramfs-tools does not discover partitions. The console and the
    # rest of vmspawn's command line arrive through SMBIOS (io.systemd.stub.kernel-cmdline-extra).
    in_tree(
        tree,
        [
            "ukify",
            "build",
            f"--linux=/boot/vmlinuz-{kernel_version}",
            f"--initrd=/boot/initrd.img-{kernel_version}",
            f"--cmdline=root=PARTUUID={root_partuuid} rw",
            f"--uname={kernel_version}",
            "--os-release=@/etc/os-release",
            "--output=/tmp/uki.efi",
        ],
        log,
    )
    shutil.move(tree / "tmp/uki.efi", work / "uki.efi")

    step("clean up the tree")
    in_tree(tree, ["apt-get", "clean"], log)
    shutil.rmtree(tree / "var/lib/apt/lists")
    (tree / "var/lib/apt/lists/partial").mkdir(parents=True)
    (tree / POLICY_RC_D).unlink()
    (tree / UNSAFE_IO).unlink()
    (tree / "etc/resolv.conf").unlink()
    # As on a booted system: /etc and /var are up to date with /usr, so the first boot does not
    # run the ConditionNeedsUpdate= services (ldconfig, hwdb, catalog, sysusers: minutes under TCG).
    usr_mtime = (tree / "usr").stat().st_mtime_ns
    for d in ("etc", "var"):
        stamp = tree / d / ".updated"
        _write(stamp, f"# Written by the vmspawnd test harness, as systemd-update-done does.\nTIMESTAMP_NSEC={usr_mtime}\n")
        os.utime(stamp, ns=(usr_mtime, usr_mtime))
    tree.chmod(0o755)

    step("disk image")
    _make_disk(work, tree, root_partuuid, log)

    step("done")
    info = {
        "kernel_version": kernel_version,
        "systemd_version": systemd_version,
        "root_partuuid": str(root_partuuid),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (work / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def _kernel_version(tree: Path) -> str:
    versions = [p.name for p in (tree / "usr/lib/modules").iterdir() if p.is_dir()]
    if len(versions) != 1:
        raise TreeBuildError(f"expected one kernel in the tree, found {versions}")
    return versions[0]


def _systemd_version(tree: Path, log: IO[str]) -> int:
    status = (tree / "var/lib/dpkg/status").read_text()
    match = re.search(r"^Package: systemd\n(?:[^\n]+\n)*?Version: (\d+)", status, re.M)
    if not match:
        raise TreeBuildError("cannot tell the tree's systemd version")
    return int(match.group(1))


def _make_disk(work: Path, tree: Path, root_partuuid: uuid.UUID, log: IO[str]) -> None:
    """disk.raw: an ESP with systemd-boot and the UKI, and the tree as the root partition."""
    used = int(subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True, check=True).stdout.split()[0])
    parts, disk_size = gpt.layout(
        [
            (gpt.ESP, uuid.uuid4(), "esp", ESP_SIZE),
            (gpt.ROOT_X86_64, root_partuuid, "root-x86-64", used * 5 // 4 + ROOT_SLACK),
        ]
    )
    esp, root = parts
    disk = work / "disk.raw"
    gpt.write_table(disk, disk_size, parts, uuid.uuid4())

    _run(["mkfs.vfat", "-F", "16", "-n", "ESP", f"--offset={esp.start}", str(disk), str(esp.size // 1024)], log, what="mkfs.vfat")
    image = f"{disk}@@{esp.offset}"
    for directory in ("::/EFI", "::/EFI/BOOT", "::/EFI/Linux", "::/loader"):
        _run(["mmd", "-i", image, directory], log, what="mmd")
    efi = tree / "usr/lib/systemd/boot/efi"
    _run(["mcopy", "-i", image, str(efi / "systemd-bootx64.efi"), "::/EFI/BOOT/BOOTX64.EFI"], log, what="mcopy")
    _run(["mcopy", "-i", image, str(work / "uki.efi"), "::/EFI/Linux/debian.efi"], log, what="mcopy")
    loader_conf = work / "loader.conf"
    loader_conf.write_text("timeout 0\n")
    _run(["mcopy", "-i", image, str(loader_conf), "::/loader/loader.conf"], log, what="mcopy")
    loader_conf.unlink()

    # The image has an fstab (the tree does not: under -D the root is virtiofs, and vmspawn says
    # `rw`); it is in the image only for as long as mkfs.ext4 copies the tree.
    fstab = tree / "etc/fstab"
    tree_fstab = fstab.read_bytes() if fstab.exists() else None
    _write(fstab, f"PARTUUID={root_partuuid} / ext4 rw,errors=remount-ro 0 0\n")
    try:
        _run(
            [
                "mkfs.ext4",
                "-F",
                "-q",
                "-L",
                "root",
                "-E",
                f"offset={root.offset}",
                "-d",
                str(tree),
                str(disk),
                f"{root.size // 1024}k",
            ],
            log,
            what="mkfs.ext4",
        )
    finally:
        if tree_fstab is None:
            fstab.unlink()
        else:
            fstab.write_bytes(tree_fstab)


def main() -> int:
    """Build if needed and print where the guest is."""
    started = time.monotonic()
    try:
        guest = ensure_real_guest()
    except TreeBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"REALGUEST={guest.directory}")
    print(f"KERNEL_VERSION={guest.kernel_version}")
    print(f"SYSTEMD_VERSION={guest.systemd_version}")
    print(f"SECONDS={time.monotonic() - started:.1f} (build: {guest.build_seconds} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
