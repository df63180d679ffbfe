# SPDX-License-Identifier: LGPL-2.1-or-later
"""Pure: what a snapshot bundle must agree on with a clone, and how a clone differs.

A restored QEMU must have exactly the device configuration of the QEMU that saved the
state: a wrong `-m`, firmware or a missing device fail, but an extra device does not (it
then sits in the guest unannounced). So the bundle keeps the source's argv with the
per-VM values blanked out (`normalize_argv`), and a clone's argv, blanked the same way,
must equal it (`differing_options`). Spec fields that cannot survive a restore are named
before anything starts (`clone_spec_json`); a clone's argv then reads its state from the
bundle and its disk from a qcow2 overlay on the bundle's frozen base (`clone_argv`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from vmspawnd.errors import to_camel
from vmspawnd.qemu import nic
from vmspawnd.qemu.command import no_locking

# Spec fields a clone takes from the bundle and may not change: they shape the virtual
# hardware (or, for a running guest, what it already booted with) and a restore cannot
# change them. directory/binds/bindUsers are virtiofs shares, which block migration.
FROZEN_FIELDS = (
    "image",
    "directory",
    "linux",
    "initrds",
    "cpus",
    "ram",
    "kvm",
    "vsock",
    "tpm",
    "network_tap",
    "network_user_mode",
    "firmware",
    "secure_boot",
    "discard_disk",
    "binds",
    "extra_drives",
    "bind_users",
    "bind_user_shell",
    "bind_user_groups",
    "forward_journal",
    "console",
    "credentials",
    "qemu_extra",
    "kernel_cmdline",
)
# What a clone sets itself, whatever the source had: its state is restored, not booted.
CLONE_OVERRIDES: dict[str, object] = {
    "growImage": None,  # the source grew its image already; the frozen base is never written
    "tpmState": "off",  # the TPM state travels in the migration stream; each clone's swtpm is its own
    "notifyReady": False,  # the guest booted long ago and sends no second READY=1
}
# Fields that name the VM itself and are the clone's own, never the source's. The MAC is:
# the bundle holds no network card, each clone plugs its own (qemu/nic.py).
OWN_FIELDS = ("name", "uuid", "vsockCid", "networkMac")

VIRTIOFS_FIELDS = ("directory", "binds", "bindUsers")


def refused_clone_fields(bundle_spec: Mapping[str, object], request: Mapping[str, object]) -> list[str]:
    """The request's fields (camelCase) that differ from the bundle and cannot (FROZEN_FIELDS)."""
    names = [to_camel(f) for f in FROZEN_FIELDS]
    return [name for name in names if name in request and request[name] != bundle_spec.get(name)]


def virtiofs_fields(spec: Mapping[str, object]) -> list[str]:
    """The spec's virtiofs shares (camelCase field names): vhost-user-fs blocks migration."""
    return [name for name in VIRTIOFS_FIELDS if spec.get(name)]


def clone_spec_json(bundle_spec: Mapping[str, object], request: Mapping[str, object], disk: str | None) -> dict[str, object]:
    """The clone's spec: the bundle's, the request's own and per-VM fields on top, the
    clone's overrides, and the bundle's frozen disk as its image (`disk`, None without one).

    The caller has checked `refused_clone_fields` first; the spec is then validated as any.
    """
    spec: dict[str, object] = {k: v for k, v in bundle_spec.items() if k not in OWN_FIELDS}
    spec.update(request)
    if disk is not None:
        spec["image"] = disk
    for key, value in CLONE_OVERRIDES.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


# --- the QEMU command line ------------------------------------------------------------------
_PER_VM_VALUES = (
    (re.compile(r"\bfd=\d+"), "fd=N"),
    (re.compile(r"\bvhostfd=\d+"), "vhostfd=N"),
    (re.compile(r"\bguest-cid=\d+"), "guest-cid=N"),
    (re.compile(r"\bguid=[0-9a-fA-F-]+"), "guid=G"),
    (re.compile(r"\bifname=[^,]*"), "ifname=T"),
    (re.compile(r"\bmac=[0-9a-fA-F:]+"), "mac=M"),
    (re.compile(r"notify_socket=[^,]*"), "notify_socket=S"),
)
DISK_DRIVE_PREFIX = "if=none,id=vmspawn,"
DISK_DEVICE_PREFIX = "virtio-blk-pci,drive=vmspawn,"


def normalize_argv(argv: Sequence[str], vm_directory: str) -> list[str]:
    """`argv` with what legitimately differs per VM blanked: its runtime directory, fd
    numbers, the vmgenid guid, the vsock CID, the TAP name and MAC, the UUID, and the disk's
    path and serial (a clone's disk is an overlay with the source's serial, see clone_argv),
    and `-add-fd` (which fds a confined QEMU's files arrive on); the network card is left
    out (a snapshot unplugs it from the source, a clone plugs its own after the restore)."""
    out: list[str] = []
    previous = ""
    for word in _without_nic(argv)[1:]:  # the binary's path may differ; its version is checked on its own
        if word == "-add-fd" or previous == "-add-fd":
            # Plumbing of a confined QEMU: which fds carry the files, not what the guest sees
            # (the drives name their sets; a clone's frozen base is one read-only fd).
            previous = word
            continue
        value = word.replace(vm_directory.rstrip("/") + "/", "$VM/")
        for pattern, blank in _PER_VM_VALUES:
            value = pattern.sub(blank, value)
        if previous == "-uuid":
            value = "U"
        elif previous == "-drive" and value.startswith(DISK_DRIVE_PREFIX):
            value = DISK_DRIVE_PREFIX + ",".join(p for p in value.split(",") if p.startswith("discard="))
        elif previous == "-device" and value.startswith(DISK_DEVICE_PREFIX):
            value = ",".join(p for p in value.split(",") if not p.startswith("serial="))
        out.append(value)
        previous = word
    return out


def _options(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(option, value) pairs of a normalized argv; a flag has the value ""."""
    pairs: list[tuple[str, str]] = []
    index = 0
    while index < len(argv):
        option = argv[index]
        has_value = index + 1 < len(argv) and not argv[index + 1].startswith("-")
        pairs.append((option, argv[index + 1] if has_value else ""))
        index += 2 if has_value else 1
    return pairs


def differing_options(saved: Sequence[str], clone: Sequence[str]) -> list[str]:
    """What a clone's normalized argv has that the saved one lacks, and the reverse, as
    `-option value` strings (each once, in argv order); empty when they agree."""
    mine, theirs = _options(saved), _options(clone)
    missing = [pair for pair in mine if pair not in theirs]
    extra = [pair for pair in theirs if pair not in mine]
    return [f"{option} {value}".rstrip() for option, value in missing + extra]


def _without_nic(argv: Sequence[str]) -> list[str]:
    """`argv` without the network card's `-device` (its root port and netdev stay)."""
    out: list[str] = []
    for word in argv:
        if out and out[-1] == "-device" and nic.is_device_options(word):
            out.pop()
        else:
            out.append(word)
    return out


def _device(argv: Sequence[str], matches: Callable[[str], bool]) -> str | None:
    """The first `-device` value of `argv` that `matches`, None without one."""
    return next((word for previous, word in zip(argv, argv[1:], strict=False) if previous == "-device" and matches(word)), None)


def nic_device(argv: Sequence[str]) -> str | None:
    """The argv's network card (qemu/nic.py), None without one."""
    return _device(argv, nic.is_device_options)


def disk_device(argv: Sequence[str]) -> str | None:
    """The guest-visible disk device of an argv (its serial included), None without one."""
    return _device(argv, lambda word: word.startswith(DISK_DEVICE_PREFIX))


def disk_file(argv: Sequence[str]) -> str | None:
    """What the VM's disk drive (`-drive if=none,id=vmspawn,file=…`) opens: a path, or the
    /dev/fdset/N the daemon passed for a confined QEMU."""
    for previous, word in zip(argv, argv[1:], strict=False):
        if previous == "-drive" and word.startswith(DISK_DRIVE_PREFIX):
            for part in _split_opts(word):
                if part.startswith("file="):
                    return part[len("file=") :].replace(",,", ",")
    return None


def _split_opts(value: str) -> list[str]:
    """QEMU's option string split at single commas (a doubled comma is part of a value)."""
    return [part.replace("\0", ",,") for part in value.replace(",,", "\0").split(",")]


def next_fdset(argv: Sequence[str]) -> int:
    """The first fdset number `argv`'s `-add-fd` options leave free."""
    sets = [re.search(r"\bset=(\d+)", word) for previous, word in zip(argv, argv[1:], strict=False) if previous == "-add-fd"]
    return max((int(m.group(1)) for m in sets if m), default=-1) + 1


def clone_argv(argv: Sequence[str], *, base: str, overlay: str, device: str | None, discard: bool) -> list[str]:
    """A clone's argv from the one built for its spec: the disk becomes a qcow2 `overlay`
    on the bundle's read-only raw `base` as an explicit -blockdev graph (no backing path
    followed, so each node can be an fdset: `base` and `overlay` may be /dev/fdset/N), behind
    the source's exact device (`device`, serial included), without the network card (the
    clone plugs it after `cont`), and QEMU waits for its state (`-incoming defer`)."""
    out: list[str] = []
    previous = ""
    for word in _without_nic(argv):
        if previous == "-drive" and word.startswith(DISK_DRIVE_PREFIX):
            out[-1] = "-blockdev"
            out += [
                f"driver=file,filename={_opt(base)}{no_locking(base, 'locking')},read-only=on,node-name=vmspawn-base-file",
                "-blockdev",
                "driver=raw,file=vmspawn-base-file,read-only=on,node-name=vmspawn-base",
                "-blockdev",
                (
                    f"driver=qcow2,file.driver=file,file.filename={_opt(overlay)}{no_locking(overlay)},backing=vmspawn-base,"
                    f"discard={'unmap' if discard else 'ignore'},node-name=vmspawn"
                ),
            ]
        elif previous == "-device" and word.startswith(DISK_DEVICE_PREFIX) and device is not None:
            out.append(device)
        else:
            out.append(word)
        previous = word
    return [*out, "-incoming", "defer"]


def _opt(value: str) -> str:
    return value.replace(",", ",,")
