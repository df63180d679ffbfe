# SPDX-License-Identifier: LGPL-2.1-or-later
"""What vmspawn finds by itself: machine images by name, kernels in a directory, root partitions.

Three look-ups systemd-vmspawn 259 does before building QEMU's command line
(docs/reference/systemd-vmspawn.md §1.1 step 4 and §3.4):

* `-M NAME` without `-D`/`-i`: the image is looked up in the machine image directories
  (`NAME.raw` file or block device ⇒ `--image`, `NAME` directory ⇒ `--directory`).
* `-D DIR` without `--linux`: the kernel comes from Boot Loader Specification entries
  with ESP = `DIR/efi` and XBOOTLDR = `DIR/boot` (the configured default entry, else the
  first UKI, else the first Type #1 entry).
* `-i IMAGE --linux=K` without `root=`/`mount.usr=` on the command line: the GPT is read
  and `root=PARTUUID=…` (or `mount.usr=PARTUUID=…` for a /usr-only image) is added.

vmspawnctl runs these on the client side: they read the caller's files with the caller's
rights, and the daemon then receives an ordinary spec (docs/deviations.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import platform
import stat
import struct
import uuid
from collections.abc import Callable

_ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def native_arch() -> str:
    """The host's architecture in the names vmspawn uses (x86_64, aarch64): it picks the QEMU
    binary, the firmware and the root partition type an image is searched for."""
    machine = platform.machine()
    return _ARCH_NAMES.get(machine, machine)


# Discoverable Partitions Specification type GUIDs for the architectures vmspawnd runs on.
ROOT_TYPES = {
    "x86_64": uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
    "aarch64": uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae"),
}
USR_TYPES = {
    "x86_64": uuid.UUID("8484680c-9521-48c6-9c11-b0720656f69e"),
    "aarch64": uuid.UUID("b0e01050-ee5f-4390-949a-9101b17104e9"),
}
GPT_FLAG_NO_AUTO = 1 << 63
GPT_SIGNATURE = b"EFI PART"

SYSTEM_IMAGE_DIRS = ("/etc/machines", "/run/machines", "/var/lib/machines", "/usr/local/lib/machines", "/usr/lib/machines")


# --------------------------------------------------------------------------------------
# Machine images by name
# --------------------------------------------------------------------------------------


def machine_image_dirs(user: bool, env: dict[str, str] | None = None) -> list[str]:
    """systemd's IMAGE_MACHINE search path; a user also searches their own dirs first."""
    env = dict(os.environ) if env is None else env
    dirs: list[str] = []
    if user:
        home = env.get("HOME", "")
        config = env.get("XDG_CONFIG_HOME") or (home + "/.config")
        state = env.get("XDG_STATE_HOME") or (home + "/.local/state")
        data = env.get("XDG_DATA_HOME") or (home + "/.local/share")
        dirs.append(config + "/machines")
        if env.get("XDG_RUNTIME_DIR"):
            dirs.append(env["XDG_RUNTIME_DIR"] + "/machines")
        dirs += [state + "/machines", data + "/machines"]
    dirs += list(SYSTEM_IMAGE_DIRS)
    return dirs


def find_machine_image(name: str, dirs: list[str]) -> tuple[str, str]:
    """`("image", path)` or `("directory", path)` for machine `name` (image_find()).

    In each directory, in order: `NAME` as a directory ⇒ directory image, `NAME.raw` as a
    regular file or block device ⇒ disk image. LookupError names every place looked at.
    """
    for directory in dirs:
        plain = os.path.join(directory, name)
        raw = plain + ".raw"
        try:
            st = os.stat(plain)
            if stat.S_ISDIR(st.st_mode):
                return "directory", plain
        except OSError:
            pass
        try:
            st = os.stat(raw)
            if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
                return "image", raw
        except OSError:
            pass
    raise LookupError(f"No image for machine '{name}' found in: {', '.join(dirs)}")


# --------------------------------------------------------------------------------------
# Boot Loader Specification
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BootEntry:
    """A kernel found through BLS: a UKI (no initrds) or a Type #1 entry's linux + initrds."""

    id: str
    kernel: str
    initrds: tuple[str, ...] = ()
    uki: bool = False


def _version_key(name: str) -> list[tuple[int, object]]:
    """Rough systemd strverscmp_improved(): digit runs compare as numbers."""
    out: list[tuple[int, object]] = []
    num = ""
    text = ""
    for ch in name:
        if ch.isdigit():
            if text:
                out.append((0, text))
                text = ""
            num += ch
        else:
            if num:
                out.append((1, int(num)))
                num = ""
            text += ch
    if num:
        out.append((1, int(num)))
    if text:
        out.append((0, text))
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _parse_type1(root: str, path: str) -> BootEntry | None:
    kernel = None
    initrds: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split(None, 1)
            if len(parts) != 2 or parts[0].startswith("#"):
                continue
            key, value = parts
            if key == "linux":
                kernel = os.path.join(root, value.strip().lstrip("/"))
            elif key == "initrd":
                initrds += [os.path.join(root, v.lstrip("/")) for v in value.split()]
    if kernel is None:
        return None
    return BootEntry(id=os.path.basename(path), kernel=kernel, initrds=tuple(initrds))


def boot_entries(directory: str) -> list[BootEntry]:
    """Type #2 (UKIs in EFI/Linux) then Type #1 (loader/entries/*.conf), each newest first."""
    ukis: list[BootEntry] = []
    confs: list[BootEntry] = []
    for root in (os.path.join(directory, "efi"), os.path.join(directory, "boot")):
        linux_dir = os.path.join(root, "EFI", "Linux")
        for name in _listdir(linux_dir):
            path = os.path.join(linux_dir, name)
            if name.lower().endswith(".efi") and os.path.isfile(path):
                ukis.append(BootEntry(id=name, kernel=path, uki=True))
        entries_dir = os.path.join(root, "loader", "entries")
        for name in _listdir(entries_dir):
            path = os.path.join(entries_dir, name)
            if name.endswith(".conf") and os.path.isfile(path):
                entry = _parse_type1(root, path)
                if entry is not None:
                    confs.append(entry)
    ukis.sort(key=lambda e: _version_key(e.id), reverse=True)
    confs.sort(key=lambda e: _version_key(e.id), reverse=True)
    return ukis + confs


def _configured_default(directory: str) -> str | None:
    for root in (os.path.join(directory, "efi"), os.path.join(directory, "boot")):
        try:
            with open(os.path.join(root, "loader", "loader.conf"), encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.strip().split(None, 1)
                    if len(parts) == 2 and parts[0] == "default":
                        return parts[1].strip()
        except OSError:
            continue
    return None


def find_boot_entry(directory: str) -> BootEntry:
    """The entry vmspawn boots for `-D DIR` without `--linux` (EFI variables ignored)."""
    entries = boot_entries(directory)
    pattern = _configured_default(directory)
    if pattern:
        for entry in entries:
            if fnmatch.fnmatchcase(entry.id, pattern):
                return entry
    ukis = [e for e in entries if e.uki]
    if ukis:
        return ukis[0]
    if entries:
        return entries[0]
    raise LookupError("Failed to locate UKI in directory type image, please specify one with --linux=.")


# --------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GptPartition:
    number: int  # 1-based
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str


def parse_gpt(read_at: Callable[[int, int], bytes]) -> list[GptPartition]:
    """The used partition entries of a GPT (primary header; 512 or 4096-byte sectors).

    `read_at(offset, length)` reads the disk, so this stays pure and testable on bytes.
    ValueError when there is no valid GPT header.
    """
    for sector in (512, 4096):
        header = read_at(sector, 92)
        if len(header) == 92 and header[:8] == GPT_SIGNATURE:
            break
    else:
        raise ValueError("no GUID partition table found")
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if entry_size < 128 or count > 1024:
        raise ValueError("implausible GPT partition entry array")
    table = read_at(entries_lba * sector, count * entry_size)
    parts: list[GptPartition] = []
    for index in range(count):
        raw = table[index * entry_size : index * entry_size + 128]
        if len(raw) < 128:
            break
        type_guid = uuid.UUID(bytes_le=raw[0:16])
        if type_guid.int == 0:
            continue
        first, last, attrs = struct.unpack_from("<QQQ", raw, 32)
        name = raw[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(GptPartition(index + 1, type_guid, uuid.UUID(bytes_le=raw[16:32]), first, last, attrs, name))
    return parts


def root_cmdline_word(partitions: list[GptPartition], arch: str) -> str:
    """`root=PARTUUID=…` for the arch's root partition, else `mount.usr=PARTUUID=…`."""
    usable = [p for p in partitions if not p.attributes & GPT_FLAG_NO_AUTO]
    for p in usable:
        if p.type_guid == ROOT_TYPES.get(arch):
            return f"root=PARTUUID={p.unique_guid}"
    for p in usable:
        if p.type_guid == USR_TYPES.get(arch):
            return f"mount.usr=PARTUUID={p.unique_guid}"
    raise LookupError(
        "Cannot perform a direct kernel boot without a root or usr partition in the image, "
        "please pass root= or mount.usr= on the kernel command line"
    )


def image_root_word(path: str, arch: str) -> str:
    """Read `path`'s GPT and return the root=/mount.usr= word vmspawn would append."""
    with open(path, "rb") as f:

        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        try:
            partitions = parse_gpt(read_at)
        except ValueError as exc:
            raise LookupError(f"{path}: {exc}; pass root= on the kernel command line") from None
    return root_cmdline_word(partitions, arch)


def cmdline_has_root(words: list[str]) -> bool:
    """vmspawn skips root synthesis when the user already chose root= or mount.usr=."""
    return any(w.startswith(("root=", "mount.usr=")) for w in words)
