# SPDX-License-Identifier: LGPL-2.1-or-later
"""Pure: a spec plus resolved resources → the QEMU invocation.

No I/O here: everything that needs the filesystem (which binary, KVM or not, firmware
and its NVRAM copy, merged initrd, socket fds) is resolved first into `Resources`,
so this function can be golden-tested scenario by scenario (libvirt's way).

The argument order follows systemd-vmspawn 259 (docs/reference/systemd-vmspawn.md §3.0). Where a
daemon must differ, docs/deviations.md says so (`-S` and a QMP monitor on a daemon-made
socket, the console chardev on a daemon-made socket with `logfile=` instead of a pty,
payload file names, vmgenid, the network card on its own root port, ...); nothing else
may differ, and the goldens in tests/golden/ pin it scenario by scenario.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os

from vmspawnd.errors import InvalidSpec
from vmspawnd.qemu import nic
from vmspawnd.qemu.opts import escape_qemu_value
from vmspawnd.qemu.resources import Resources, VirtiofsShare
from vmspawnd.qemu.siphash import derive_mac, shorten_tap_name
from vmspawnd.spec import ConsoleMode, VmSpec

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class QemuCommand:
    argv: list[str]
    pass_fds: list[int]
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # path → content, written 0600 first
    # device_add arguments of devices plugged after `cont` (a clone's network card: snapshot.py).
    hotplug: list[dict[str, str]] = dataclasses.field(default_factory=list)


def is_x86(arch: str) -> bool:
    return arch in ("x86_64", "i386")


def machine_type(arch: str) -> str:
    return "q35" if is_x86(arch) else "virt"


def memory_mib(ram: int) -> int:
    """vmspawn rounds up to whole MiB: ceil(bytes / 1 MiB)."""
    return math.ceil(ram / MIB)


def kernel_command_line(spec: VmSpec, res: Resources | None = None) -> list[str]:
    """The words vmspawn passes to the kernel: console=hvc0 first (not for gui), then ARGS
    (root=PARTUUID= already appended by the client), then what helpers add (virtiofs root,
    systemd.mount-extra= per bind mount), in vmspawn's order (docs/reference/systemd-vmspawn.md §1.2 steps 13-18).
    """
    words: list[str] = []
    if spec.console != ConsoleMode.GUI:
        words.append("console=hvc0")
    words.extend(spec.kernel_cmdline)
    if res is not None:
        words.extend(res.kernel_cmdline_extra)
    return words


SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class _FdSets:
    """Files the daemon opened for a confined QEMU: `-add-fd` puts each fd in its own
    set (a read-write and a read-only fd for what QEMU writes), and QEMU opens
    `/dev/fdset/N` instead of the path, dup'ing the set's fd whose access mode matches."""

    def __init__(self, res: Resources, fds: list[int]) -> None:
        self.file_fds = res.file_fds
        self.fds = fds
        self.next_set = 0

    def file(self, path: str, argv: list[str]) -> str:
        """What QEMU is told to open for `path`; adds the `-add-fd` it needs to `argv`."""
        fds = self.file_fds.get(path)
        if not fds:
            return path
        fdset = self.next_set
        self.next_set += 1
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={fdset},opaque={escape_qemu_value(path)}"]
        self.fds += fds
        return f"/dev/fdset/{fdset}"


def no_locking(filename: str, option: str = "file.locking") -> str:
    """`,file.locking=off` for a node QEMU opens through an fdset: QEMU 7.2 cannot take its
    image locks back through the set after a migration; the daemon holds the lock
    (qemu/handover.py). Nothing for a path QEMU opens itself."""
    return f",{option}=off" if filename.startswith("/dev/fdset/") else ""


class _Payloads:
    """SMBIOS type 11 payload files: path= keeps them (secrets included) out of the cmdline."""

    def __init__(self, res: Resources) -> None:
        self.dir = res.payload_dir
        self.files: dict[str, bytes] = {}

    def add(self, name: str, content: bytes) -> list[str]:
        if self.dir is None:
            raise InvalidSpec("spec", "SMBIOS payloads need a payload directory")
        path = os.path.join(self.dir, name)
        if path in self.files:
            raise InvalidSpec("credentials", f"Duplicated credential '{name}'")
        self.files[path] = content
        return ["-smbios", f"type=11,path={escape_qemu_value(path)}"]


def build_qemu_command(spec: VmSpec, res: Resources) -> QemuCommand:
    """Build argv, the fds QEMU must inherit and the payload files, in vmspawn 259's order
    (docs/reference/systemd-vmspawn.md §3.0); where the daemon differs, docs/deviations.md says why."""
    argv: list[str] = [res.qemu_binary]
    fds: list[int] = []
    x86 = is_x86(res.arch)
    smbios = res.arch in ("x86_64", "i386", "aarch64", "arm")
    sb = res.firmware is not None and res.firmware.secure_boot
    name = res.name or spec.machine_name()
    virtiofs = bool(res.virtiofs)
    payloads = _Payloads(res)
    fdsets = _FdSets(res, fds)

    machine = f"type={machine_type(res.arch)}"
    if x86:
        machine += f",smm={'on' if sb else 'off'}"
    if virtiofs:
        machine += ",memory-backend=mem"
    if x86:
        machine += ",hpet=off"
    argv += ["-machine", machine]
    argv += ["-smp", spec.cpus]
    mem = memory_mib(spec.ram)
    argv += ["-m", f"{mem}M"]
    argv += ["-object", "rng-random,filename=/dev/urandom,id=rng0"]
    argv += ["-device", "virtio-rng-pci,rng=rng0,id=rng-device0"]
    argv += ["-device", "virtio-balloon,free-page-reporting=on"]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    if x86:
        argv += ["-device", f"vmgenid,guid={res.vmgenid or 'auto'}"]

    # Daemon deviation: the card on a root port of its own, unpluggable for snapshots (qemu/nic.py).
    if spec.network_tap:
        mac = spec.network_mac
        if mac is None:
            if res.host_machine_id is None:
                raise InvalidSpec("networkTap", "the host has no /etc/machine-id to derive the MAC from")
            mac = derive_mac(res.host_machine_id, name)
        argv += ["-netdev", f"{_tap(name, res, fds)},id={nic.NETDEV_ID}"]
        argv += ["-device", nic.port_options(), "-device", nic.device_options(mac)]
    elif spec.network_user_mode:
        argv += ["-netdev", f"user,id={nic.NETDEV_ID}"]
        argv += ["-device", nic.port_options(), "-device", nic.device_options(None)]
    else:
        argv += ["-nic", "none"]

    if virtiofs:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on"]

    argv += ["-accel", "kvm" if res.kvm else "tcg"]
    if res.vsock_cid is not None and res.vhost_vsock_fd is not None:
        argv += ["-device", f"vhost-vsock-pci,guest-cid={res.vsock_cid},vhostfd={res.vhost_vsock_fd}"]
        fds.append(res.vhost_vsock_fd)
    argv += ["-cpu", "max,hv_relaxed,hv-vapic,hv-time" if res.arch == "x86_64" else "max"]

    # Daemon deviation: paused start and a QMP monitor on a socket the daemon bound.
    argv += ["-S"]
    argv += ["-chardev", f"socket,id=vmspawn-qmp,fd={res.qmp_fd},server=on,wait=off"]
    argv += ["-mon", "chardev=vmspawn-qmp,mode=control"]
    fds.append(res.qmp_fd)
    if res.confined:  # docs/security.md
        argv += ["-sandbox", SANDBOX]

    argv += _console_args(spec, res, fds)

    if res.firmware is not None:
        fw = res.firmware
        code = fdsets.file(fw.code_path, argv)
        argv += ["-drive", f"if=pflash,format={fw.code_format},readonly=on,file={escape_qemu_value(code)}{no_locking(code)}"]
        if fw.secure_boot and fw.vars_path is not None:
            argv += ["-global", "ICH9-LPC.disable_s3=1"]
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
            # vmspawn uses the executable's format for the vars drive too (docs/reference/systemd-vmspawn.md §3.3).
            nvram = fdsets.file(fw.vars_path, argv)
            argv += ["-drive", f"file={escape_qemu_value(nvram)}{no_locking(nvram)},if=pflash,format={fw.code_format}"]

    if spec.linux:
        argv += ["-kernel", res.kernel or spec.linux]

    if spec.image:
        image = fdsets.file(spec.image, argv)
        argv += [
            "-drive",
            (
                f"if=none,id=vmspawn,file={escape_qemu_value(image)},format=raw,"
                f"discard={'on' if spec.discard_disk else 'off'}{no_locking(image)}"
            ),
        ]
        serial = escape_qemu_value(os.path.basename(spec.image))
        argv += ["-device", f"virtio-blk-pci,drive=vmspawn,bootindex=1,serial={serial}"]

    root_shares = [v for v in res.virtiofs if v.tag == "root"]
    other_shares = [v for v in res.virtiofs if v.tag != "root"]
    for share in root_shares:
        argv += _virtiofs_args(share)

    for index, path in enumerate(spec.extra_drives):
        node = f"vmspawn_extra_{index}"
        driver = "host_device" if path in res.block_devices else "file"
        filename = fdsets.file(path, argv)
        argv += [
            "-blockdev",
            (
                f"driver=raw,cache.direct=off,cache.no-flush=on,file.driver={driver},"
                f"file.filename={escape_qemu_value(filename)}{no_locking(filename)},node-name={node}"
            ),
        ]
        serial = escape_qemu_value(os.path.basename(path))
        argv += ["-device", f"virtio-blk-pci,drive={node},serial={serial}"]

    for share in other_shares:
        argv += _virtiofs_args(share)

    words = kernel_command_line(spec, res)
    cmdline = " ".join(words)
    if words:
        if spec.linux:
            argv += ["-append", cmdline]
        elif smbios:
            for key in ("io.systemd.stub.kernel-cmdline-extra", "io.systemd.boot.kernel-cmdline-extra"):
                argv += payloads.add(key, f"{key}={cmdline}".encode())

    if smbios:
        for index, text in enumerate(spec.smbios11):
            argv += payloads.add(f"smbios11-{index}", text.encode())

    if res.tpm_socket is not None:
        argv += ["-chardev", f"socket,id=chrtpm,path={escape_qemu_value(res.tpm_socket)}"]
        argv += ["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"]
        argv += ["-device", "tpm-tis,tpmdev=tpm0" if x86 else "tpm-tis-device,tpmdev=tpm0"]

    if res.initrd:
        argv += ["-initrd", res.initrd]

    credentials = [(c.id, base64.b64decode(c.data)) for c in spec.credentials]
    credentials += [(c.id, c.data) for c in res.credentials]
    seen: set[str] = set()
    for cred_id, data in credentials:
        if cred_id in seen:
            raise InvalidSpec("credentials", f"Duplicated credential '{cred_id}'")
        seen.add(cred_id)
        if smbios:
            payload = f"io.systemd.credential.binary:{cred_id}=".encode() + base64.b64encode(data)
            argv += payloads.add(f"credential.{cred_id}", payload)

    if res.notify_address is not None and smbios:
        value = f"io.systemd.credential:vmm.notify_socket={res.notify_address}"
        argv += ["-smbios", f"type=11,value={escape_qemu_value(value)}"]

    argv += spec.qemu_extra
    return QemuCommand(argv=argv, pass_fds=fds, files=payloads.files)


def _tap(name: str, res: Resources, fds: list[int]) -> str:
    """vmspawn lets QEMU create the TAP device by name; a confined QEMU (no CAP_NET_ADMIN)
    gets the device the daemon created (qemu/handover.py) as an fd instead."""
    if res.tap_fd is not None:
        fds.append(res.tap_fd)
        return f"tap,fd={res.tap_fd}"
    return f"tap,ifname={escape_qemu_value(shorten_tap_name(name))},script=no,downscript=no"


def _virtiofs_args(share: VirtiofsShare) -> list[str]:
    return [
        "-chardev",
        f"socket,id={share.chardev_id},path={escape_qemu_value(share.socket_path)}",
        "-device",
        f"vhost-user-fs-pci,queue-size=1024,chardev={share.chardev_id},tag={escape_qemu_value(share.tag)}",
    ]


def _console_args(spec: VmSpec, res: Resources, fds: list[int]) -> list[str]:
    mode = ConsoleMode(spec.console)
    if mode is ConsoleMode.GUI:
        if res.display_socket is None:
            return ["-vga", "virtio"]
        return ["-vga", "virtio", "-display", "none", "-vnc", f"unix:{escape_qemu_value(res.display_socket)}"]
    args = ["-nographic", "-nodefaults"]
    if mode is ConsoleMode.HEADLESS:
        return args
    assert res.console_fd is not None
    fds.append(res.console_fd)
    chardev = (
        f"socket,id=console,fd={res.console_fd},server=on,wait=off,logfile={escape_qemu_value(res.console_log)},logappend=on"
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
