# SPDX-License-Identifier: LGPL-2.1-or-later
"""Answer what a spec needs from the host, before anything is started.

Path problems are the client's (`InvalidSpec` naming the field); a missing binary or
firmware is the host's (`StartFailed` at step `resolve`). Files this step creates
(NVRAM copy, merged initrd) go into the VM's runtime directory and die with it.
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
from pathlib import Path

from . import firmware as firmware_db
from .errors import InvalidSpec, StartFailed
from .qemu_command import Firmware
from .spec import VmSpec

_ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def native_arch() -> str:
    machine = platform.machine()
    return _ARCH_NAMES.get(machine, machine)


def find_qemu_binary(arch: str) -> str:
    """$PATH order as vmspawn: qemu, qemu-kvm, qemu-system-ARCH (no override variable)."""
    for candidate in ("qemu", "qemu-kvm", f"qemu-system-{arch}"):
        found = shutil.which(candidate)
        if found:
            return found
    raise StartFailed("resolve", f"no QEMU binary in $PATH (tried qemu, qemu-kvm, qemu-system-{arch})")


def decide_kvm(requested: bool | None) -> bool:
    """--kvm=auto means: /dev/kvm exists (vmspawn checks existence only)."""
    if requested is not None:
        return requested
    return os.path.exists("/dev/kvm")


def check_regular_file(field: str, path: str) -> None:
    """The file must exist and be a regular file; say precisely what it is instead."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InvalidSpec(field, f"{path} is a dangling symbolic link") from None
        raise InvalidSpec(field, f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidSpec(field, f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidSpec(field, f"{path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidSpec(field, f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InvalidSpec(field, f"{path} is not readable")


def check_disk(field: str, path: str) -> None:
    """Disks may be regular files or block devices, nothing else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InvalidSpec(field, f"{path} is a dangling symbolic link") from None
        raise InvalidSpec(field, f"{path} does not exist") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidSpec(field, f"{path} is neither a regular file nor a block device")


def check_spec_paths(spec: VmSpec) -> None:
    if spec.linux:
        check_regular_file("linux", spec.linux)
    for index, path in enumerate(spec.initrds):
        check_regular_file(f"initrds[{index}]", path)
    if spec.image:
        check_disk("image", spec.image)
    for index, path in enumerate(spec.extra_drives):
        check_disk(f"extraDrives[{index}]", path)


def merge_initrds(paths: list[str], target: Path) -> str:
    """One initrd is used as is; several are concatenated, each at a 4-byte aligned offset
    (the kernel's requirement for cpio archives), as vmspawn does.
    """
    if len(paths) == 1:
        return paths[0]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for path in paths:
            pad = -out.tell() % 4
            out.write(b"\0" * pad)
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
    return str(target)


def resolve_firmware(arch: str, secure_boot: bool | None, vars_copy: Path) -> Firmware:
    """Pick the first acceptable descriptor (vmspawn's search order and filters) and give
    secure-boot firmware a private copy of its NVRAM template.
    """
    descriptors = []
    for path in firmware_db.find_descriptor_paths(os.environ.get("XDG_CONFIG_HOME")):
        try:
            descriptors.append(firmware_db.parse_descriptor(path, Path(path).read_bytes()))
        except (OSError, ValueError):
            continue  # vmspawn skips unreadable or incomplete descriptors (debug log)
    try:
        chosen = firmware_db.select_firmware(descriptors, arch, secure_boot)
    except LookupError as exc:
        raise StartFailed("resolve", str(exc)) from None
    vars_path = None
    if chosen.supports_secure_boot:
        fd = os.open(vars_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, open(chosen.nvram_template_path, "rb") as src:
            shutil.copyfileobj(src, out)
        vars_path = str(vars_copy)
    return Firmware(
        code_path=chosen.executable_path,
        code_format=chosen.executable_format,
        secure_boot=chosen.supports_secure_boot,
        vars_path=vars_path,
    )
