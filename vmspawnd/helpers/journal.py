# SPDX-License-Identifier: LGPL-2.1-or-later
"""`--forward-journal=FILE|DIR`: systemd-journal-remote on a vsock listener (docs/reference/systemd-vmspawn.md §7).

vmspawn listens on `vsock:2:<cid>` (port = the guest's CID, so every VM has its own port)
and tells the guest's journald where to send with the `journal.forward_to_socket`
credential. The daemon binds the AF_VSOCK listener itself and hands it to journal-remote
as a socket-activated fd 3 (journal-remote reads $LISTEN_FDS; $LISTEN_PID must be its own
pid, which only a tiny shell trampoline can know before exec). Without vhost-vsock on the
host there is no way for the guest to reach it, so the option fails with an error that
says so instead of starting a journal-remote nobody can talk to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

from vmspawnd.errors import InvalidSpec, NotSupported
from vmspawnd.helpers.spawn import start_helper
from vmspawnd.host.process import ChildProcess
from vmspawnd.qemu.resources import Credential

LIBEXEC_CANDIDATES = ("/usr/lib/systemd/systemd-journal-remote", "/lib/systemd/systemd-journal-remote")
VMADDR_CID_HOST = 2
# Moves the listener to fd 3 and exports LISTEN_PID=$$ (the pid exec keeps) before exec.
# bash, not sh: dash only redirects single-digit fds.
TRAMPOLINE = (
    'exec 3<&"$LISTEN_SRC_FD" {LISTEN_SRC_FD}<&-; '
    "export LISTEN_FDS=1 LISTEN_FDNAMES=journal LISTEN_PID=$$; "
    'unset LISTEN_SRC_FD; exec "$@"'
)


def find_journal_remote() -> str | None:
    """The systemd libexec directory first, then $PATH, as vmspawn."""
    for path in LIBEXEC_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("systemd-journal-remote")


def split_mode(output: str) -> str:
    """One file when the target ends in `.journal`, else a directory split by host."""
    return "none" if output.endswith(".journal") else "host"


def journal_remote_argv(binary: str, output: str) -> list[str]:
    return [binary, "--output", output, "--split-mode", split_mode(output)]


def trampoline_argv(listen_fd: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`bash -c` wrapper that makes `listen_fd` the socket-activated fd 3 of `argv`."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LISTEN_SRC_FD": str(listen_fd)}
    return ["/bin/bash", "-c", TRAMPOLINE, "bash", *argv], env


def forward_credential(cid: int) -> Credential:
    return Credential("journal.forward_to_socket", f"vsock:{VMADDR_CID_HOST}:{cid}".encode())


def vsock_available() -> bool:
    return os.path.exists("/dev/vhost-vsock") and hasattr(socket, "AF_VSOCK")


def check_output(output: str) -> None:
    if not output.startswith("/"):
        raise InvalidSpec("forwardJournal", f"must be an absolute path, got {output!r}")
    if split_mode(output) == "host" and not os.path.isdir(output):
        raise InvalidSpec("forwardJournal", f"{output} is not a directory (journal-remote needs it to exist)")


def start_journal_remote(
    output: str, cid: int | None, directory: Path, stack: contextlib.AsyncExitStack
) -> tuple[ChildProcess, Credential]:
    """Start journal-remote for a VM with vsock CID `cid`; clear errors where it cannot work."""
    check_output(output)
    if cid is None or not vsock_available():
        raise NotSupported("--forward-journal needs AF_VSOCK to the guest (no /dev/vhost-vsock on this host)")
    binary = find_journal_remote()
    if binary is None:
        raise NotSupported("--forward-journal: systemd-journal-remote is not installed")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((VMADDR_CID_HOST, cid))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    argv, env = trampoline_argv(sock.fileno(), journal_remote_argv(binary, output))
    child = start_helper("journal-remote", argv, directory=directory, stack=stack, listen=sock, env=env)
    return child, forward_credential(cid)
