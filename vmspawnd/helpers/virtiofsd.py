# SPDX-License-Identifier: LGPL-2.1-or-later
"""virtiofsd for `--directory` (the root) and each `--bind`/`--bind-ro` share.

Two incompatible virtiofsd programs exist. systemd-vmspawn 259 speaks only the Rust one
(`--shared-dir DIR --fd N --xattr --no-announce-submounts [--translate-uid/gid]`), found on
$PATH or in /usr/libexec, /usr/lib. Debian bookworm ships QEMU's older C virtiofsd at
/usr/lib/qemu/virtiofsd (`--fd=N -o source=DIR,…`), which cannot translate IDs. The daemon
probes which one is installed (its `--help`) and speaks its dialect; options that need ID
mapping (`--private-users` for the root, `--bind-user`) fail up front, naming the binary.

Guest side as 259 (docs/reference/systemd-vmspawn.md §3.6, §3.12): tag `root` plus `root=root rootfstype=virtiofs
rw`; share J gets tag `mntJ` and `systemd.mount-extra="mntJ:DST:virtiofs:ro|rw"` with `"`
and `:` in DST C-escaped. Read-only is also enforced host side where virtiofsd can
(`--readonly`, Rust ≥ 1.11); the C virtiofsd has no such option, so there only the guest's
read-only mount protects the share (as in vmspawn, which never enforced it host side).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import secrets
import shutil
from pathlib import Path

from vmspawnd.errors import InvalidSpec, NotSupported, StartFailed
from vmspawnd.helpers import bind_user
from vmspawnd.helpers.spawn import listen_unix, start_helper
from vmspawnd.host.process import ChildProcess
from vmspawnd.qemu.resources import VirtiofsShare
from vmspawnd.runtime_dir import SOCKET_PATH_MAX
from vmspawnd.spec import VmSpec
from vmspawnd.spec.parsers import parse_private_users

C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
RUST_LOCATIONS = ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
MAX_TAG_LENGTH = 36  # virtio-fs config space: tag[36]
PROBE_TIMEOUT = 10.0


class Dialect(enum.StrEnum):
    RUST = "rust"
    C = "c"


@dataclasses.dataclass(frozen=True)
class Virtiofsd:
    """An installed virtiofsd and what its command line accepts."""

    path: str
    dialect: Dialect
    readonly: bool = False  # has --readonly (host-side read-only shares)

    @property
    def maps_ids(self) -> bool:
        return self.dialect is Dialect.RUST


@dataclasses.dataclass(frozen=True)
class Share:
    """One virtiofsd to start: host `source` shown to the guest as `tag`."""

    tag: str
    source: str
    read_only: bool = False
    uid_map: tuple[int, int, int] | None = None  # (VM id, host id, count), as --translate-uid


def candidates() -> list[str]:
    """vmspawn's lookup order (PATH, /usr/libexec, /usr/lib), then QEMU's C virtiofsd."""
    found = [p for p in (shutil.which("virtiofsd"), *RUST_LOCATIONS, C_VIRTIOFSD) if p]
    return [p for p in dict.fromkeys(found) if os.access(p, os.X_OK)]


def parse_help(path: str, help_text: str) -> Virtiofsd | None:
    """Which dialect a `--help` text belongs to (None: not a virtiofsd we can drive)."""
    if "--shared-dir" in help_text:
        return Virtiofsd(path, Dialect.RUST, readonly="--readonly" in help_text)
    if "source=PATH" in help_text or "-o source=" in help_text:
        return Virtiofsd(path, Dialect.C, readonly=False)
    return None


async def probe() -> Virtiofsd | None:
    """The first installed virtiofsd whose dialect we recognise (bounded, reaped)."""
    for path in candidates():
        proc = await asyncio.create_subprocess_exec(
            path,
            "--help",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                out, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            continue
        found = parse_help(path, out.decode("utf-8", "replace"))
        if found is not None:
            return found
    return None


def escape_fuse_option(value: str) -> str:
    """fuse_opt splits `-o` on commas; a backslash makes the next character literal."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(daemon: Virtiofsd, share: Share, fd: int) -> list[str]:
    """The command line for one share, in the installed virtiofsd's dialect."""
    if daemon.dialect is Dialect.RUST:
        argv = [daemon.path, "--shared-dir", share.source, "--xattr", "--fd", str(fd), "--no-announce-submounts"]
        if share.uid_map is not None:
            vm, host, count = share.uid_map
            argv += ["--translate-uid", f"map:{vm}:{host}:{count}", "--translate-gid", f"map:{vm}:{host}:{count}"]
        if share.read_only and daemon.readonly:
            argv.append("--readonly")
        return argv
    if share.uid_map is not None:
        raise NotSupported(f"ID mapping with {daemon.path} (QEMU's C virtiofsd cannot translate IDs)")
    # -f: stay in the foreground (the daemon supervises it); xattr as vmspawn's --xattr.
    return [daemon.path, f"--fd={fd}", "-f", "-o", f"source={escape_fuse_option(share.source)},cache=auto,xattr"]


def c_escape_mount_target(target: str) -> str:
    """259 escapes `"` and `:` in the systemd.mount-extra target (as \\x22, \\x3a)."""
    return target.replace('"', "\\x22").replace(":", "\\x3a")


def mount_extra_word(tag: str, target: str, read_only: bool) -> str:
    return f'systemd.mount-extra="{tag}:{c_escape_mount_target(target)}:virtiofs:{"ro" if read_only else "rw"}"'


def plan_shares(spec: VmSpec) -> tuple[list[Share], list[str]]:
    """The virtiofsd instances and kernel command line words the spec asks for (no I/O)."""
    shares: list[Share] = []
    words: list[str] = []
    if spec.directory:
        uid_map = None
        if spec.private_users:
            try:
                base, count = parse_private_users(spec.private_users)
            except ValueError as exc:
                raise InvalidSpec("privateUsers", str(exc)) from None
            uid_map = (0, base, count)
        shares.append(Share("root", spec.directory, uid_map=uid_map))
        words += ["root=root", "rootfstype=virtiofs", "rw"]
    for index, bind in enumerate(spec.binds):
        if not bind.target.startswith("/"):
            raise InvalidSpec(f"binds[{index}].target", f"must be an absolute path, got {bind.target!r}")
        tag = f"mnt{index}"
        shares.append(Share(tag, bind.source, read_only=bind.read_only))
        words.append(mount_extra_word(tag, bind.target, bind.read_only))
    for share in shares:
        if len(share.tag.encode()) > MAX_TAG_LENGTH:
            raise InvalidSpec("binds", f"virtiofs tag {share.tag!r} longer than {MAX_TAG_LENGTH} bytes")
    return shares, words


def add_bind_user_shares(
    shares: list[Share], words: list[str], users: list[bind_user.BoundUser]
) -> tuple[list[Share], list[str]]:
    """Each bound user's home as one more share (the next mntJ tag), mapped 1:1 host ↔ VM ID."""
    shares, words = list(shares), list(words)
    index = sum(1 for share in shares if share.tag.startswith("mnt"))
    for user in users:
        tag = f"mnt{index}"
        index += 1
        shares.append(Share(tag, user.host.home, uid_map=(user.vm_id, user.host.uid, 1)))
        words.append(mount_extra_word(tag, user.vm_home, False))
    return shares, words


def socket_path(directory: Path) -> Path:
    path = directory / f"sock-{secrets.token_hex(8)}"
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise StartFailed("helpers", f"virtiofsd socket path longer than {SOCKET_PATH_MAX} bytes: {path}")
    return path


async def start_virtiofsd(
    spec: VmSpec, directory: Path, stack: contextlib.AsyncExitStack
) -> tuple[dict[str, ChildProcess], tuple[VirtiofsShare, ...], tuple[str, ...]]:
    """Start one virtiofsd per share; returns processes, QEMU shares and kernel words."""
    shares, words = plan_shares(spec)
    bound = bind_user.bind_users(spec.bind_users, bind_user.lookup_host_user) if spec.bind_users else []
    bind_user.check_homes(bound, os.path.isdir)
    shares, words = add_bind_user_shares(shares, words, bound)
    if not shares:
        return {}, (), ()
    daemon = await probe()
    if daemon is None:
        raise StartFailed("helpers", "virtiofsd is not installed (needed by --directory/--bind)")
    # Check everything before starting anything: a bad share must not leave half the set running.
    for share in shares:
        if not os.path.isdir(share.source):
            field = "directory" if share.tag == "root" else "binds"
            raise InvalidSpec(field, f"{share.source} is not a directory (virtiofs shares directories)")
        if share.uid_map is not None and not daemon.maps_ids:
            field = "privateUsers" if share.tag == "root" else "bindUsers"
            raise InvalidSpec(field, f"{daemon.path} (QEMU's C virtiofsd) cannot translate IDs, which {field} needs")
    processes: dict[str, ChildProcess] = {}
    qemu_shares: list[VirtiofsShare] = []
    for share in shares:
        path = socket_path(directory)
        sock = listen_unix(path, stack)
        name = f"virtiofsd-{share.tag}"
        processes[name] = start_helper(
            name, virtiofsd_argv(daemon, share, sock.fileno()), directory=directory, stack=stack, listen=sock
        )
        chardev = "rootdir" if share.tag == "root" else share.tag
        qemu_shares.append(VirtiofsShare(tag=share.tag, chardev_id=chardev, socket_path=str(path)))
    return processes, tuple(qemu_shares), tuple(words)
