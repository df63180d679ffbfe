# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the QEMU argv builder (command.py) needs besides the spec: `Resources`.

A VM's resources come from three places, each answered once and in this order by
Machine.start: the host (`HostResources`, qemu/resolve.py: binary, KVM, firmware and NVRAM
copy, merged initrd, vsock), the helper processes (`HelperResources`, helpers/: swtpm,
virtiofsd, credentials, kernel command line words), and the daemon's own channels to QEMU
(`Channels`: the sockets it bound, the payload directory, the notify address). `assemble`
joins them into the one flat `Resources` the pure builder and its goldens use.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Firmware:
    """The firmware as resolved for one VM (descriptor chosen, NVRAM copied if needed)."""

    code_path: str
    code_format: str
    secure_boot: bool
    vars_path: str | None  # the VM's private copy of the template (secure-boot firmware only)


@dataclasses.dataclass(frozen=True)
class VirtiofsShare:
    """A virtiofsd the daemon started: QEMU connects to its socket (chardev), guest sees `tag`."""

    tag: str
    chardev_id: str
    socket_path: str


@dataclasses.dataclass(frozen=True)
class Credential:
    """A credential for the guest (SMBIOS type 11 `io.systemd.credential.binary:ID=base64`)."""

    id: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class Resources:
    """Everything the spec needs that only the host can answer (and what helpers provide)."""

    qemu_binary: str
    kvm: bool
    qmp_fd: int
    console_fd: int | None
    console_log: str
    firmware: Firmware | None
    initrd: str | None  # a single initrd, or the merged copy of several
    arch: str = "x86_64"
    # Filled by the helper processes (swtpm, virtiofsd, journal, SSH keys) and the notify listener:
    tpm_socket: str | None = None
    virtiofs: tuple[VirtiofsShare, ...] = ()  # the root share has tag "root", bind mounts mnt<j>
    credentials: tuple[Credential, ...] = ()
    kernel_cmdline_extra: tuple[str, ...] = ()
    payload_dir: str | None = None  # where SMBIOS payload files are written (0600)
    vsock_cid: int | None = None
    vhost_vsock_fd: int | None = None
    notify_address: str | None = None
    # --console=gui: where the display goes. None: QEMU's own window in the session the
    # daemon runs in (vmspawn's behaviour); a path: no window, a VNC server on that socket.
    display_socket: str | None = None
    # Host facts resolve.py provides:
    name: str | None = None  # the machine name the daemon uses (default: spec.machine_name())
    host_machine_id: bytes | None = None  # /etc/machine-id as 16 bytes, for the TAP MAC
    vmgenid: str | None = None  # a UUID; None gives QEMU's guid=auto (a random one)
    block_devices: frozenset[str] = frozenset()  # extra drives that are block devices
    # A confined QEMU (system instance, docs/security.md): the daemon opens, QEMU receives.
    confined: bool = False  # -sandbox on, with every optional deny
    file_fds: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # path → fds opened for QEMU (-add-fd)
    kernel: str | None = None  # the VM's readable copy of --linux (None: the spec's path)
    tap_fd: int | None = None  # --network-tap: the TAP device the daemon created


@dataclasses.dataclass(frozen=True)
class HostResources:
    """What only the host can answer for one VM (qemu/resolve.py:resolve_host)."""

    qemu_binary: str
    kvm: bool
    arch: str
    firmware: Firmware | None
    initrd: str | None
    host_machine_id: bytes | None
    vmgenid: str | None
    block_devices: frozenset[str]
    vsock_cid: int | None
    vhost_vsock_fd: int | None  # QEMU's once passed; Machine.start closes the daemon's copy
    # Confined QEMU only (qemu/handover.py); like vhost_vsock_fd, the daemon closes its copies after the spawn.
    file_fds: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    kernel: str | None = None
    tap_fd: int | None = None


@dataclasses.dataclass(frozen=True)
class HelperResources:
    """What the helper processes contribute (helpers/__init__.py:start_helpers)."""

    tpm_socket: str | None = None
    virtiofs: tuple[VirtiofsShare, ...] = ()
    credentials: tuple[Credential, ...] = ()
    kernel_cmdline_extra: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Channels:
    """The daemon's own ways to QEMU and the guest, made by Machine.start."""

    qmp_fd: int
    console_fd: int | None
    console_log: str
    payload_dir: str
    notify_address: str | None
    display_socket: str | None


def assemble(name: str, host: HostResources, helpers: HelperResources, channels: Channels, confined: bool = False) -> Resources:
    """The one `Resources` of a VM, from its three sources; `confined`: QEMU runs sandboxed."""
    return Resources(
        name=name,
        qemu_binary=host.qemu_binary,
        kvm=host.kvm,
        arch=host.arch,
        firmware=host.firmware,
        initrd=host.initrd,
        host_machine_id=host.host_machine_id,
        vmgenid=host.vmgenid,
        block_devices=host.block_devices,
        vsock_cid=host.vsock_cid,
        vhost_vsock_fd=host.vhost_vsock_fd,
        confined=confined,
        file_fds=host.file_fds,
        kernel=host.kernel,
        tap_fd=host.tap_fd,
        tpm_socket=helpers.tpm_socket,
        virtiofs=helpers.virtiofs,
        credentials=helpers.credentials,
        kernel_cmdline_extra=helpers.kernel_cmdline_extra,
        qmp_fd=channels.qmp_fd,
        console_fd=channels.console_fd,
        console_log=channels.console_log,
        payload_dir=channels.payload_dir,
        notify_address=channels.notify_address,
        display_socket=channels.display_socket,
    )
