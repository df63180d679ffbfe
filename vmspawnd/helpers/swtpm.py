# SPDX-License-Identifier: LGPL-2.1-or-later
"""The VM's software TPM: decide, manufacture once, run swtpm on a daemon-bound socket.

As systemd-vmspawn 259 (docs/reference/systemd-vmspawn.md §3.10): `--tpm=auto` uses swtpm when it is installed,
`--tpm=yes` makes any failure fatal; the state lives beside the image or directory
(`NAME.tpmstate`, persistent, 0700) for `--tpm-state=auto`, at PATH when given, and in a
transient `<machine>-tpm/` directory inside the VM directory for `off` (or when there is
neither image nor directory). `swtpm_setup --not-overwrite` manufactures a TPM only once;
an swtpm_setup that lacks `--profile-name` (older than 0.10, like bookworm's 0.7) fails
with it, so it is retried without, as vmspawn does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from vmspawnd.errors import InvalidSpec, NotSupported, StartFailed
from vmspawnd.helpers.spawn import listen_unix, log_path, start_helper
from vmspawnd.host.confinement import unprivileged_prefix
from vmspawnd.host.identity import VmIdentity, hand_over, hand_over_tree
from vmspawnd.host.process import ChildProcess, read_tail
from vmspawnd.spec import VmSpec

_log = logging.getLogger(__name__)

TPM_ARCHES = ("x86_64", "aarch64", "arm")
SETUP_TIMEOUT = 180.0  # EK generation under TCG-loaded hosts can be slow
SOCKET_NAME = "tpm.sock"


@dataclasses.dataclass(frozen=True)
class TpmState:
    """Where the TPM state lives and whether it outlives the VM."""

    path: Path
    persistent: bool


def tpm_wanted(spec: VmSpec, arch: str, swtpm: str | None) -> bool:
    """auto → only if swtpm is installed and the arch has a TPM device; yes → must work."""
    if spec.tpm is False:
        return False
    if arch not in TPM_ARCHES:
        if spec.tpm:
            raise NotSupported(f"a TPM on {arch} (only {', '.join(TPM_ARCHES)})")
        return False
    if swtpm is None:
        if spec.tpm:
            raise StartFailed("helpers", "--tpm=yes but swtpm is not installed (not found in $PATH)")
        return False
    return True


def state_location(spec: VmSpec, machine_name: str, directory: Path) -> TpmState:
    """As docs/reference/systemd-vmspawn.md §3.10: auto ⇒ `<image or dir>.tpmstate` beside it; off ⇒ transient."""
    value = spec.tpm_state
    transient = TpmState(directory / f"{machine_name}-tpm", persistent=False)
    if value in ("off", "", "no", "false"):
        return transient
    if value == "auto":
        source = spec.image or spec.directory
        if not source:
            return transient
        base = Path(source.rstrip("/") or "/")
        return TpmState(base.parent / f"{base.name}.tpmstate", persistent=True)
    if not value.startswith("/"):
        raise InvalidSpec("tpmState", f"must be auto, off or an absolute path, got {value!r}")
    return TpmState(Path(value), persistent=True)


def setup_argv(swtpm_setup: str, state: Path, profile: bool) -> list[str]:
    argv = [swtpm_setup, "--tpm-state", str(state), "--tpm2", "--pcr-banks", "sha256", "--not-overwrite"]
    if profile:
        argv += ["--profile-name", "default-v2"]
    return argv


def swtpm_argv(swtpm: str, state: Path, ctrl_fd: int) -> list[str]:
    """The control channel is the listening socket; QEMU sends the data fd over it.

    State files are written 0600 (swtpm's default is 0640): the TPM's secrets are the
    VM owner's alone, whatever group the directory's files would otherwise share.
    """
    return [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state},mode=0600", "--ctrl", f"type=unixio,fd={ctrl_fd}"]


async def manufacture(swtpm_setup: str, state: Path, log: Path) -> None:
    """Run swtpm_setup (a no-op for an already manufactured state), retrying without a profile."""
    for profile in (True, False):
        status = await _run_logged(setup_argv(swtpm_setup, state, profile), log)
        if status == 0:
            return
        _log.info("swtpm_setup %s failed with status %s", "with a profile" if profile else "", status)
    raise StartFailed("helpers", f"swtpm_setup failed for TPM state {state}", read_tail(log, 2048))


# swtpm_setup starts an swtpm it does not wait for: that orphan would go to PID 1 (or, on a
# host whose PID 1 does not reap, stay a zombie). This wrapper makes itself the child
# subreaper, runs swtpm_setup, then reaps every leftover descendant before it exits.
_REAPER = (
    "import ctypes, os, subprocess, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER\n"
    "status = subprocess.call(sys.argv[1:])\n"
    "while True:\n"
    "    try:\n"
    "        os.wait()\n"
    "    except ChildProcessError:\n"
    "        break\n"
    "sys.exit(status)\n"
)


async def _run_logged(argv: list[str], log: Path) -> int:
    """Run to completion with output appended to `log`; bounded, and always reaped
    (with every process it leaves behind, see _REAPER)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _REAPER,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
        )
    finally:
        os.close(fd)
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            return await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise


def give_state_to(state: TpmState, identity: VmIdentity, stack: contextlib.AsyncExitStack) -> None:
    """The VM's swtpm runs as the VM's uid: its state becomes the VM's while it runs, and a
    persistent state goes back to its owner afterwards (the next start may get another id,
    and an id left owning files would let a later VM with that id read them)."""
    if state.persistent:
        owner = os.lstat(state.path)
        stack.callback(hand_over_tree, state.path, VmIdentity(owner.st_uid, owner.st_gid))
    hand_over_tree(state.path, identity)


def _start_confined(
    swtpm: str,
    state: TpmState,
    sock: socket.socket,
    sock_path: Path,
    identity: VmIdentity,
    directory: Path,
    stack: contextlib.AsyncExitStack,
) -> ChildProcess:
    """swtpm as the VM's id, without capabilities. It reaches its state through an inherited
    directory fd (/proc/self/fd/N: a magic link, no search permission needed on the path's
    parents), and QEMU, the same id, may connect to its socket."""
    give_state_to(state, identity, stack)
    hand_over(sock_path, identity)
    state_fd = os.open(state.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        argv = [*unprivileged_prefix(identity), *swtpm_argv(swtpm, Path(f"/proc/self/fd/{state_fd}"), sock.fileno())]
        return start_helper("swtpm", argv, directory=directory, stack=stack, listen=sock, pass_fds=[state_fd])
    finally:
        os.close(state_fd)


async def start_swtpm(
    spec: VmSpec,
    machine_name: str,
    directory: Path,
    arch: str,
    stack: contextlib.AsyncExitStack,
    identity: VmIdentity | None = None,
) -> tuple[ChildProcess, Path] | None:
    """Start swtpm if wanted; returns the process and the socket QEMU connects to.

    With an `identity`, swtpm_setup and swtpm run as it, without capabilities
    (host/confinement.py), and QEMU (the same identity) may connect to the socket."""
    swtpm = shutil.which("swtpm")
    if not tpm_wanted(spec, arch, swtpm):
        return None
    assert swtpm is not None
    swtpm_setup = shutil.which("swtpm_setup")
    if swtpm_setup is None:
        if spec.tpm:
            raise StartFailed("helpers", "--tpm=yes but swtpm_setup is not installed")
        return None
    state = state_location(spec, machine_name, directory)
    try:
        if state.persistent:
            state.path.mkdir(mode=0o700, parents=False, exist_ok=True)
        else:
            state.path.mkdir(mode=0o700)
            stack.callback(shutil.rmtree, state.path, ignore_errors=True)
        # Manufacturing runs before any guest code, as root: swtpm_setup spawns swtpm
        # itself (closing inherited fds), and the state may lie below directories the VM's
        # id cannot enter (a caller's 0700 home).
        await manufacture(swtpm_setup, state.path, log_path(directory, "swtpm_setup"))
        sock_path = directory / SOCKET_NAME
        sock = listen_unix(sock_path, stack)
        if identity is None:
            argv = swtpm_argv(swtpm, state.path, sock.fileno())
            child = start_helper("swtpm", argv, directory=directory, stack=stack, listen=sock)
        else:
            child = _start_confined(swtpm, state, sock, sock_path, identity, directory, stack)
    except (StartFailed, OSError) as exc:
        if spec.tpm:
            raise
        # --tpm=auto: like vmspawn, a TPM that cannot start is not fatal.
        _log.warning("%s: no TPM: %s", machine_name, exc)
        return None
    return child, sock_path
