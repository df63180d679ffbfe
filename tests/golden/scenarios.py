# SPDX-License-Identifier: LGPL-2.1-or-later
"""Golden scenarios: a spec plus fixed Resources each, one `NAME.args` file per scenario.

Paths under /GOLDEN are placeholders; the QEMU launch test maps them to real files.
Scenarios in HAND_WRITTEN have goldens written by hand from quotes in
docs/reference/systemd-vmspawn.md §3 (plus the deviations in docs/deviations.md), never regenerated.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import TypedDict, Unpack

from vmspawnd.qemu.resources import Credential, Firmware, Resources, VirtiofsShare
from vmspawnd.spec import BindMount, CredentialData, VmSpec

G = "/GOLDEN"
IMG = f"{G}/images/fedora.raw"
KERNEL = f"{G}/boot/vmlinuz"
INITRD = f"{G}/boot/initrd"
PAYLOAD = f"{G}/run/payload"
OVMF = Firmware("/usr/share/OVMF/OVMF_CODE_4M.fd", "raw", False, None)
OVMF_SB = Firmware("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "raw", True, f"{G}/run/efi-vars.fd")

BASE = Resources(
    qemu_binary="/usr/bin/qemu-system-x86_64",
    kvm=False,
    qmp_fd=3,
    console_fd=4,
    console_log="/GOLDEN/run/console.log",
    firmware=OVMF,
    initrd=None,
    payload_dir=PAYLOAD,
    host_machine_id=bytes.fromhex("0123456789abcdef0123456789abcdef"),
    vmgenid="a1b2c3d4-0000-4000-8000-000000000001",
)


class Differences(TypedDict, total=False):
    """The Resources fields the scenarios set differently from BASE."""

    arch: str
    block_devices: frozenset[str]
    confined: bool
    console_fd: int | None
    credentials: tuple[Credential, ...]
    display_socket: str | None
    file_fds: dict[str, tuple[int, ...]]
    firmware: Firmware | None
    initrd: str | None
    kernel: str | None
    kernel_cmdline_extra: tuple[str, ...]
    kvm: bool
    notify_address: str | None
    qemu_binary: str
    tap_fd: int | None
    tpm_socket: str | None
    vhost_vsock_fd: int | None
    virtiofs: tuple[VirtiofsShare, ...]
    vmgenid: str | None
    vsock_cid: int | None


def _r(**kw: Unpack[Differences]) -> Resources:
    return dataclasses.replace(BASE, **kw)


def _cred(cred_id: str, data: bytes) -> CredentialData:
    return CredentialData(cred_id, base64.b64encode(data).decode())


ROOT_SHARE = VirtiofsShare("root", "rootdir", f"{G}/run/sock-root")
MNT0 = VirtiofsShare("mnt0", "mnt0", f"{G}/run/sock-mnt0")
MNT1 = VirtiofsShare("mnt1", "mnt1", f"{G}/run/sock-mnt1")
DIR_WORDS = ("root=root", "rootfstype=virtiofs", "rw")

SCENARIOS: dict[str, tuple[VmSpec, Resources]] = {
    "image-minimal": (VmSpec(image=IMG), BASE),
    "linux-direct": (VmSpec(name="direct", linux=KERNEL, kernel_cmdline=["quiet", "systemd.unit=rescue.target"]), BASE),
    "linux-initrd": (VmSpec(name="direct", linux=KERNEL, initrds=[INITRD]), _r(initrd=INITRD)),
    "linux-initrds-merged": (VmSpec(name="direct", linux=KERNEL, initrds=[INITRD, INITRD + "2"]), _r(initrd=f"{G}/run/initrd")),
    "cpus-ram": (VmSpec(image=IMG, cpus="4", ram=3 * 1024**3 // 2), BASE),
    "ram-rounding": (VmSpec(image=IMG, ram=300 * 1024 * 1024 + 1), BASE),
    "smp-topology": (VmSpec(image=IMG, cpus="4,sockets=2,cores=2"), BASE),
    "kvm": (VmSpec(image=IMG, kvm=True), _r(kvm=True)),
    "uuid": (VmSpec(image=IMG, uuid="6a1b9ea2-8e85-4d5c-9bb3-2a0a0f1d0c2e"), BASE),
    "network-user": (VmSpec(image=IMG, network_user_mode=True), BASE),
    "network-tap": (VmSpec(image=IMG, network_tap=True), BASE),
    "network-tap-mac": (VmSpec(image=IMG, network_tap=True, network_mac="02:11:22:33:44:55"), BASE),
    "network-tap-long-name": (VmSpec(name="a-very-long-machine-name", image=IMG, network_tap=True), BASE),
    "discard-off": (VmSpec(image=IMG, discard_disk=False), BASE),
    "extra-drive": (VmSpec(name="direct", linux=KERNEL, extra_drives=[f"{G}/images/data.raw"]), BASE),
    "extra-drives-two": (VmSpec(image=IMG, extra_drives=[f"{G}/images/a.raw", f"{G}/images/b.img"]), BASE),
    "extra-drive-block-device": (VmSpec(image=IMG, extra_drives=["/dev/loop7"]), _r(block_devices=frozenset({"/dev/loop7"}))),
    "firmware-cmdline-smbios": (VmSpec(image=IMG, kernel_cmdline=["systemd.log_level=debug"]), BASE),
    "firmware-secure-boot": (VmSpec(image=IMG, secure_boot=True), _r(firmware=OVMF_SB)),
    "no-firmware": (VmSpec(name="direct", linux=KERNEL), _r(firmware=None)),
    "smbios11": (VmSpec(image=IMG, smbios11=["io.systemd.stub.kernel-cmdline-extra=x", "hello, world"]), BASE),
    "credentials-set": (VmSpec(image=IMG, credentials=[_cred("passwd.plaintext-password.root", b"secret")]), BASE),
    "credentials-binary": (VmSpec(name="direct", linux=KERNEL, credentials=[_cred("bin", b"a\0b\xff\n")]), BASE),
    "credentials-generated": (
        VmSpec(image=IMG),
        _r(credentials=(Credential("ssh.ephemeral-authorized_keys-all", b"ssh-ed25519 AAAA key\n"),)),
    ),
    "credentials-both": (
        VmSpec(image=IMG, credentials=[_cred("a", b"1"), _cred("b", b"2")]),
        _r(credentials=(Credential("journal.forward_to_socket", b"vsock:2:42"),)),
    ),
    "notify": (VmSpec(image=IMG), _r(notify_address="vsock-stream:2:12345")),
    "tpm": (VmSpec(image=IMG), _r(tpm_socket=f"{G}/run/tpm.sock")),
    "tpm-comma-path": (VmSpec(image=IMG), _r(tpm_socket=f"{G}/run/t,pm.sock")),
    "directory": (
        VmSpec(directory=f"{G}/trees/root", linux=KERNEL),
        _r(virtiofs=(ROOT_SHARE,), kernel_cmdline_extra=DIR_WORDS),
    ),
    "binds": (
        VmSpec(image=IMG, binds=[BindMount(f"{G}/src", "/mnt/src"), BindMount(f"{G}/ro", "/mnt/ro", True)]),
        _r(
            virtiofs=(MNT0, MNT1),
            kernel_cmdline_extra=(
                'systemd.mount-extra="mnt0:/mnt/src:virtiofs:rw"',
                'systemd.mount-extra="mnt1:/mnt/ro:virtiofs:ro"',
            ),
        ),
    ),
    "directory-bind-extra": (
        VmSpec(
            directory=f"{G}/trees/root",
            linux=KERNEL,
            binds=[BindMount(f"{G}/src", "/srv")],
            extra_drives=[f"{G}/images/data.raw"],
        ),
        _r(virtiofs=(ROOT_SHARE, MNT0), kernel_cmdline_extra=DIR_WORDS + ('systemd.mount-extra="mnt0:/srv:virtiofs:rw"',)),
    ),
    "vsock": (VmSpec(image=IMG, vsock=True), _r(vsock_cid=1234567, vhost_vsock_fd=5)),
    "console-read-only": (VmSpec(image=IMG, console="read-only"), BASE),
    "console-native": (VmSpec(image=IMG, console="native"), BASE),
    "console-gui": (VmSpec(image=IMG, console="gui"), _r(console_fd=None)),
    "console-gui-display-socket": (VmSpec(image=IMG, console="gui"), _r(console_fd=None, display_socket="/GOLDEN/run/display")),
    "console-headless": (VmSpec(image=IMG, console="headless"), _r(console_fd=None)),
    "qemu-extra": (VmSpec(image=IMG, qemu_extra=["-device", "virtio-tablet-pci", "-no-reboot"]), BASE),
    "escape-image-path": (VmSpec(image=f"{G}/images/a,b=c.raw"), BASE),
    "linux-image-partuuid": (
        VmSpec(image=IMG, linux=KERNEL, kernel_cmdline=["root=PARTUUID=8c8f8b6e-7e9c-4bd1-a0a8-0d7b1a6c9e11"]),
        BASE,
    ),
    "gui-firmware-cmdline": (VmSpec(image=IMG, console="gui", kernel_cmdline=["splash"]), _r(console_fd=None)),
    "no-argv-effect": (
        VmSpec(
            image=IMG,
            slice="vms.slice",
            properties=["MemoryMax=1G"],
            register=False,
            keep_unit=True,
            private_users="100000:65536",
            pass_ssh_key=False,
            ssh_key_type="rsa",
            term="xterm-256color",
            notify_ready=False,
            tpm_state="off",
            forward_journal=None,
        ),
        BASE,
    ),
    "aarch64": (
        VmSpec(image=IMG, credentials=[_cred("x", b"y")]),
        _r(arch="aarch64", qemu_binary="/usr/bin/qemu-system-aarch64", tpm_socket=f"{G}/run/tpm.sock", vmgenid=None),
    ),
    "vmgenid-auto": (VmSpec(image=IMG), _r(vmgenid=None)),
    "kitchen-sink": (
        VmSpec(
            name="sink",
            image=IMG,
            linux=KERNEL,
            initrds=[INITRD],
            cpus="2",
            ram=512 * 1024**2,
            uuid="11111111-2222-4333-8444-555555555555",
            network_user_mode=True,
            discard_disk=False,
            extra_drives=[f"{G}/images/data.raw"],
            smbios11=["foo=bar"],
            credentials=[_cred("c1", b"v1")],
            binds=[BindMount(f"{G}/src", "/srv")],
            qemu_extra=["-no-reboot"],
            kernel_cmdline=["root=/dev/vda1"],
        ),
        _r(
            initrd=INITRD,
            firmware=OVMF_SB,
            tpm_socket=f"{G}/run/tpm.sock",
            virtiofs=(MNT0,),
            kernel_cmdline_extra=('systemd.mount-extra="mnt0:/srv:virtiofs:rw"',),
            notify_address="vsock-stream:2:999",
            credentials=(Credential("ssh.ephemeral-authorized_keys-all", b"ssh-ed25519 K"),),
        ),
    ),
    # The system instance's confined QEMU (docs/security.md): -sandbox, disks and firmware
    # by fd (-add-fd; a writable file's set holds a read-write and a read-only fd), the TAP
    # device by fd, kernel and initrd from the VM's own copies.
    "confined-image": (
        VmSpec(image=IMG, network_tap=True, extra_drives=[f"{G}/images/data.raw"]),
        _r(
            confined=True,
            file_fds={OVMF.code_path: (10,), IMG: (11, 12), f"{G}/images/data.raw": (13, 14)},
            tap_fd=15,
        ),
    ),
    "confined-secure-boot-linux": (
        VmSpec(name="direct", image=IMG, linux=KERNEL, initrds=[INITRD], secure_boot=True, credentials=[_cred("c1", b"v1")]),
        _r(
            confined=True,
            firmware=OVMF_SB,
            file_fds={OVMF_SB.code_path: (10,), f"{G}/run/efi-vars.fd": (11, 12), IMG: (13, 14)},
            kernel=f"{G}/run/kernel",
            initrd=f"{G}/run/initrd",
            tpm_socket=f"{G}/run/tpm.sock",
        ),
    ),
}

# Written by hand from docs/reference/systemd-vmspawn.md §3 (quotes) and docs/deviations.md; see HANDWRITTEN.md.
HAND_WRITTEN = frozenset(
    {
        "image-minimal",
        "linux-direct",
        "linux-initrd",
        "uuid",
        "network-user",
        "discard-off",
        "extra-drive",
        "firmware-cmdline-smbios",
        "firmware-secure-boot",
        "smbios11",
        "credentials-set",
        "tpm",
        "directory",
    }
)
