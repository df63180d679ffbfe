# SPDX-License-Identifier: LGPL-2.1-or-later
"""Pure: a spec plus resolved resources → the QEMU invocation.

No I/O here: everything that needs the filesystem (which binary, KVM or not, firmware
and its NVRAM copy, merged initrd, socket fds) is resolved first into `Resources`,
so this function can be golden-tested scenario by scenario (libvirt's way).

The argument order follows systemd-vmspawn 259 (vmspawn-reference.md §3.0). Where a
daemon must differ, docs/deviations.md says so: `-S` (continued over QMP once wired),
a QMP monitor on a daemon-made socket, and the console chardev on a daemon-made,
reconnectable socket with `logfile=` instead of a pty.
"""

from __future__ import annotations

import dataclasses
import math
import os

from .qemu_opts import escape_qemu_value
from .spec import ConsoleMode, VmSpec

MIB = 1024 * 1024


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
    virtiofs: tuple[VirtiofsShare, ...] = ()
    credentials: tuple[Credential, ...] = ()
    kernel_cmdline_extra: tuple[str, ...] = ()
    payload_dir: str | None = None  # where SMBIOS payload files are written (0600)
    vsock_cid: int | None = None
    vhost_vsock_fd: int | None = None
    notify_address: str | None = None


@dataclasses.dataclass(frozen=True)
class QemuCommand:
    argv: list[str]
    pass_fds: list[int]
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # path → content, written 0600 first


def is_x86(arch: str) -> bool:
    return arch in ("x86_64", "i386")


def machine_type(arch: str) -> str:
    return "q35" if is_x86(arch) else "virt"


def memory_mib(ram: int) -> int:
    """vmspawn rounds up to whole MiB: ceil(bytes / 1 MiB)."""
    return math.ceil(ram / MIB)


def kernel_command_line(spec: VmSpec) -> list[str]:
    """The words vmspawn passes to the kernel: console=hvc0 first (not for gui), then ARGS."""
    words: list[str] = []
    if spec.console != ConsoleMode.GUI:
        words.append("console=hvc0")
    words.extend(spec.kernel_cmdline)
    return words


def build_qemu_command(spec: VmSpec, res: Resources) -> QemuCommand:
    """Build argv and the fds QEMU must inherit; see the module docstring for the order."""
    argv: list[str] = [res.qemu_binary]
    fds: list[int] = []
    x86 = is_x86(res.arch)
    sb = res.firmware is not None and res.firmware.secure_boot

    machine = f"type={machine_type(res.arch)}"
    if x86:
        machine += f",smm={'on' if sb else 'off'}"
        machine += ",hpet=off"
    argv += ["-machine", machine]
    argv += ["-smp", spec.cpus]
    argv += ["-m", f"{memory_mib(spec.ram)}M"]
    argv += ["-object", "rng-random,filename=/dev/urandom,id=rng0"]
    argv += ["-device", "virtio-rng-pci,rng=rng0,id=rng-device0"]
    argv += ["-device", "virtio-balloon,free-page-reporting=on"]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    if spec.network_user_mode:
        argv += ["-nic", "user,model=virtio-net-pci"]
    else:
        argv += ["-nic", "none"]
    argv += ["-accel", "kvm" if res.kvm else "tcg"]
    argv += ["-cpu", "max,hv_relaxed,hv-vapic,hv-time" if res.arch == "x86_64" else "max"]

    # Daemon deviation: paused start and a QMP monitor on a socket the daemon bound.
    argv += ["-S"]
    argv += ["-chardev", f"socket,id=vmspawn-qmp,fd={res.qmp_fd},server=on,wait=off"]
    argv += ["-mon", "chardev=vmspawn-qmp,mode=control"]
    fds.append(res.qmp_fd)

    argv += _console_args(spec, res, fds)

    if res.firmware is not None:
        fw = res.firmware
        argv += [
            "-drive",
            f"if=pflash,format={fw.code_format},readonly=on,file={escape_qemu_value(fw.code_path)}",
        ]
        if fw.secure_boot and fw.vars_path is not None:
            argv += ["-global", "ICH9-LPC.disable_s3=1"]
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
            # vmspawn uses the executable's format for the vars drive too (reference §3.3).
            argv += [
                "-drive",
                f"file={escape_qemu_value(fw.vars_path)},if=pflash,format={fw.code_format}",
            ]

    if spec.linux:
        argv += ["-kernel", spec.linux]

    if spec.image:
        argv += [
            "-drive",
            f"if=none,id=vmspawn,file={escape_qemu_value(spec.image)},format=raw,"
            f"discard={'on' if spec.discard_disk else 'off'}",
        ]
        serial = escape_qemu_value(os.path.basename(spec.image))
        argv += ["-device", f"virtio-blk-pci,drive=vmspawn,bootindex=1,serial={serial}"]

    for index, path in enumerate(spec.extra_drives):
        node = f"vmspawn_extra_{index}"
        argv += [
            "-blockdev",
            "driver=raw,cache.direct=off,cache.no-flush=on,file.driver=file,"
            f"file.filename={escape_qemu_value(path)},node-name={node}",
        ]
        serial = escape_qemu_value(os.path.basename(path))
        argv += ["-device", f"virtio-blk-pci,drive={node},serial={serial}"]

    cmdline = " ".join(kernel_command_line(spec))
    if spec.linux:
        if cmdline:
            argv += ["-append", cmdline]

    if res.initrd:
        argv += ["-initrd", res.initrd]

    return QemuCommand(argv=argv, pass_fds=fds)


def _console_args(spec: VmSpec, res: Resources, fds: list[int]) -> list[str]:
    mode = ConsoleMode(spec.console)
    if mode is ConsoleMode.GUI:
        return ["-vga", "virtio"]
    args = ["-nographic", "-nodefaults"]
    if mode is ConsoleMode.HEADLESS:
        return args
    assert res.console_fd is not None
    fds.append(res.console_fd)
    chardev = (
        f"socket,id=console,fd={res.console_fd},server=on,wait=off,"
        f"logfile={escape_qemu_value(res.console_log)},logappend=on"
    )
    if mode is ConsoleMode.NATIVE:
        # QEMU's multiplexed console with its monitor (Ctrl-a c), relayed by the daemon.
        chardev += ",mux=on"
    args += ["-device", "virtio-serial-pci,id=vmspawn-virtio-serial-pci"]
    args += ["-chardev", chardev]
    args += ["-device", "virtconsole,chardev=console"]
    if mode is ConsoleMode.NATIVE:
        args += ["-mon", "console"]
    return args
