# SPDX-License-Identifier: LGPL-2.1-or-later
"""Answer what a spec needs from the host, before anything is started.

Path problems are the client's (`InvalidSpec` naming the field); a missing binary or
firmware is the host's (`StartFailed` at step `resolve`). Files this step creates
(NVRAM copy, merged initrd) go into the VM's runtime directory and die with it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from vmspawnd.errors import InvalidSpec, StartFailed
from vmspawnd.host.identity import VmIdentity, hand_over
from vmspawnd.qemu import handover, vsock
from vmspawnd.qemu.resources import Firmware, HostResources
from vmspawnd.qemu.siphash import shorten_tap_name
from vmspawnd.runtime_dir import VmPaths
from vmspawnd.spec import VmSpec
from vmspawnd.spec import firmware as firmware_db
from vmspawnd.spec.discovery import native_arch


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


def stat_path(field: str, path: str) -> os.stat_result:
    """stat() a path a spec names; a missing one is explained (absent, or a dangling link)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InvalidSpec(field, f"{path} is a dangling symbolic link") from None
        raise InvalidSpec(field, f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidSpec(field, f"{path}: {exc.strerror}") from None


def check_regular_file(field: str, path: str) -> None:
    """The file must exist and be a regular file; say precisely what it is instead."""
    st = stat_path(field, path)
    if stat.S_ISDIR(st.st_mode):
        raise InvalidSpec(field, f"{path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidSpec(field, f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InvalidSpec(field, f"{path} is not readable")


def check_disk(field: str, path: str) -> None:
    """Disks may be regular files or block devices, nothing else."""
    st = stat_path(field, path)
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
    if spec.directory and not os.path.isdir(spec.directory):
        raise InvalidSpec("directory", f"{spec.directory} is not a directory")
    for index, bind in enumerate(spec.binds):
        if not os.path.isdir(bind.source):
            raise InvalidSpec(f"binds[{index}].source", f"{bind.source} is not a directory")


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
    return firmware_for(chosen, vars_copy)


def firmware_for(chosen: firmware_db.FirmwareDescriptor, vars_copy: Path) -> Firmware:
    """The firmware as the VM uses it; Secure Boot firmware gets a private copy of its
    NVRAM template (0600, never through a symlink), as vmspawn 259 does."""
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


def load_firmware(arch: str, descriptor: str | None, secure_boot: bool | None, vars_copy: Path) -> Firmware:
    """`--firmware=PATH` (parsed, not filtered) or the search; `--secure-boot=yes` with a
    non-Secure-Boot descriptor is refused as vmspawn 259 does (EMEDIUMTYPE)."""
    if descriptor is None:
        return resolve_firmware(arch, secure_boot, vars_copy)
    check_regular_file("firmware", descriptor)
    try:
        chosen = firmware_db.parse_descriptor(descriptor, Path(descriptor).read_bytes())
    except ValueError as exc:
        raise InvalidSpec("firmware", f"{descriptor}: {exc}") from None
    if secure_boot and not chosen.supports_secure_boot:
        raise InvalidSpec("secureBoot", f"Secure Boot requested, but {descriptor} does not support it")
    return firmware_for(chosen, vars_copy)


def grow_image(path: str, size: int) -> int:
    """--grow-image: round up to 4096 and ftruncate only if the file is smaller (never shrink).

    Returns the new size. The image must be a regular file (a block device cannot grow).
    """
    target = (size + 4095) // 4096 * 4096
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidSpec("growImage", f"{path} is not a regular file, cannot grow it")
        if st.st_size < target:
            os.ftruncate(fd, target)
            os.fsync(fd)
            return target
        return st.st_size
    finally:
        os.close(fd)


def host_machine_id(path: str = "/etc/machine-id") -> bytes | None:
    """The host's machine ID as 16 bytes (for the TAP MAC), or None when there is none."""
    try:
        text = Path(path).read_text().strip()
        return bytes.fromhex(text) if len(text) == 32 else None
    except (OSError, ValueError):
        return None


def block_devices(paths: list[str]) -> frozenset[str]:
    """Which extra drives are block devices (QEMU's host_device driver instead of file)."""
    return frozenset(p for p in paths if stat.S_ISBLK(os.stat(p).st_mode))


VMGENID_APP_ID = bytes.fromhex("bd846de3e47d4b6ca6854a870f3ca3a0")


def derive_vmgenid(invocation_id: str) -> str:
    """systemd's app-specific id: HMAC-SHA256(key=invocation id, msg=app id), 128 bits,
    marked as a v4 UUID. The daemon uses the VM's per-start id as its invocation id."""
    import hashlib
    import hmac
    import uuid

    key = bytes.fromhex(invocation_id.replace("-", "")) if len(invocation_id.replace("-", "")) == 32 else invocation_id.encode()
    digest = bytearray(hmac.new(key, VMGENID_APP_ID, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(digest)))


def resolve_host(
    spec: VmSpec,
    name: str,
    machine_id: str,
    paths: VmPaths,
    identity: VmIdentity | None = None,
    frozen_image: bool = False,
) -> HostResources:
    """Everything the host must answer for the VM, checked before anything starts.

    Grows the image and writes the VM's merged initrd and NVRAM copy into its directory.
    With an `identity` (a confined QEMU) the daemon also opens what QEMU would open
    (qemu/handover.py) and copies kernel and initrd for it. The fds are opened last, so
    nothing can fail with them open: the caller owns them from here on. `frozen_image`: the
    image is a clone's frozen base (snapshot bundle), opened read-only.
    """
    check_spec_paths(spec)
    arch = native_arch()
    if spec.grow_image is not None and spec.image:
        grow_image(spec.image, spec.grow_image)
    initrd = merge_initrds(list(spec.initrds), paths.initrd) if spec.initrds else None
    firmware = load_firmware(arch, spec.firmware, spec.secure_boot, paths.efi_vars)
    kernel = None
    if identity is not None:
        kernel, initrd = _readable_boot_files(spec, initrd, paths, identity)
    qemu_binary = find_qemu_binary(arch)
    kvm = decide_kvm(spec.kvm)
    drives = block_devices(list(spec.extra_drives))
    machine_id_bytes = host_machine_id()
    try:
        file_fds = handover.open_files(spec, firmware, image_writable=not frozen_image) if identity is not None else {}
    except OSError as exc:
        raise StartFailed("resolve", f"{exc.filename}: {exc.strerror or exc}") from None
    tap_fd = vsock_fd = vsock_cid = None
    step = "TAP device"
    try:
        if identity is not None and spec.network_tap:
            tap_fd = handover.open_tap(shorten_tap_name(name))
        step = "vsock"
        vsock_fd = vsock.open_vhost_vsock(spec.vsock)
        if vsock_fd is not None:
            vsock_cid = vsock.assign_cid(vsock_fd, name, spec.vsock_cid)
    except OSError as exc:
        handover.close_all([fd for fd in (vsock_fd, tap_fd) if fd is not None])
        handover.close_all(fd for fds in file_fds.values() for fd in fds)
        raise StartFailed("resolve", f"{step}: {exc.strerror or exc}") from None
    return HostResources(
        qemu_binary=qemu_binary,
        kvm=kvm,
        arch=arch,
        firmware=firmware,
        initrd=initrd,
        host_machine_id=machine_id_bytes,
        vmgenid=derive_vmgenid(machine_id),
        block_devices=drives,
        vsock_cid=vsock_cid,
        vhost_vsock_fd=vsock_fd,
        file_fds=file_fds,
        kernel=kernel,
        tap_fd=tap_fd,
    )


def _readable_boot_files(spec: VmSpec, initrd: str | None, paths: VmPaths, identity: VmIdentity) -> tuple[str | None, str | None]:
    """Kernel and initrd as a confined QEMU can read them (it takes no fd for them)."""
    kernel = handover.copy_for_vm(spec.linux, paths.kernel, identity) if spec.linux else None
    if initrd is not None:
        if initrd == str(paths.initrd):
            hand_over(paths.initrd, identity)  # the merged copy is ours already
        else:
            initrd = handover.copy_for_vm(initrd, paths.initrd, identity)
    return kernel, initrd
