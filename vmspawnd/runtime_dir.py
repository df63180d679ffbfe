# SPDX-License-Identifier: LGPL-2.1-or-later
"""The layout of a daemon's runtime directory, and safe writes into it.

    RUNTIME/                      0755: others must reach the manager socket to be told
                                  PermissionDenied (rather than EACCES); all below is private
      io.vmspawnd.Manager         manager socket, 0666 (when not socket-activated)
      lock                        one daemon per runtime directory (flock), 0600
      machines/                   0700
      seals/                      0700: SHA-256 of each confined VM's state.json (state_seal)
      machines/ID/                0700, one per VM; ID is 8 hex digits; files 0600; owned by
                                  the VM's own id when confined (docs/security.md)
        state.json                versioned MachineRecord, replaced atomically
        qmp                       QMP listening socket (bound by the daemon, fd passed to QEMU)
        console                   console listening socket (ditto)
        console.log               console history: QEMU's logfile=, rotated by the daemon
        console.log.1             the history before the last rotation (each ≤ 1 MiB)
        qemu.log                  QEMU stdout+stderr
        qemu.exit                 QEMU's wait status, written by the reaper (survives a restart)
        control                   io.systemd.MachineInstance socket of the VM
        display                   --console=gui without a session: QEMU's VNC socket
        notify                    the guest's notify socket (AF_UNIX stand-in for vsock)
        efi-vars.fd, initrd       the VM's NVRAM copy and merged initrd (gone with QEMU)
        kernel                    a confined QEMU's copy of --linux (and initrd: of a single one)
        payload/                  0700: SMBIOS payload files, credentials (gone with QEMU)

`VmPaths` names these; the helpers own their own names in the same directory (swtpm's
tpm.sock and NAME-tpm/, virtiofsd's sock-*, the SSH key pair).

IDs are short because AF_UNIX paths must stay under 108 bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import socket
import stat
from pathlib import Path

SOCKET_PATH_MAX = 107  # sizeof(sun_path) minus the terminating NUL
MANAGER_SOCKET_NAME = "io.vmspawnd.Manager"


@dataclasses.dataclass(frozen=True)
class VmPaths:
    """The files of one VM's directory (machines/ID/), as the module docstring lays them out."""

    directory: Path

    @property
    def state(self) -> Path:
        return self.directory / "state.json"

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp"

    @property
    def console(self) -> Path:
        return self.directory / "console"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def display(self) -> Path:
        return self.directory / "display"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def exit_status(self) -> Path:
        return self.directory / "qemu.exit"

    @property
    def control(self) -> Path:
        return self.directory / "control"

    @property
    def notify(self) -> Path:
        return self.directory / "notify"

    @property
    def efi_vars(self) -> Path:
        return self.directory / "efi-vars.fd"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd"

    @property
    def kernel(self) -> Path:
        return self.directory / "kernel"

    @property
    def payload(self) -> Path:
        return self.directory / "payload"

    def socket(self, name: str) -> Path:
        """A listening socket the daemon binds for QEMU: `qmp` or `console`."""
        return self.directory / name

    def transient(self) -> tuple[Path, ...]:
        """What ends with QEMU (sockets, NVRAM copy, merged initrd); the record, logs and
        console history stay until Remove."""
        return (self.qmp, self.console, self.display, self.notify, self.efi_vars, self.initrd, self.kernel)


def default_runtime_dir() -> Path:
    """/run/vmspawnd for root (system instance), $XDG_RUNTIME_DIR/vmspawnd otherwise."""
    if os.geteuid() == 0:
        return Path("/run/vmspawnd")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg:
        raise RuntimeError("XDG_RUNTIME_DIR is not set; pass --runtime-dir=DIR")
    return Path(xdg) / "vmspawnd"


def new_machine_id() -> str:
    return secrets.token_hex(4)


def check_socket_path(path: Path) -> None:
    """Refuse early what bind() would refuse late with a less helpful error."""
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ValueError(f"socket path too long for AF_UNIX ({SOCKET_PATH_MAX} bytes max): {path}")


def make_private_dir(path: Path) -> None:
    """Create a 0700 directory, refusing a symlink planted in its place."""
    path.mkdir(mode=0o700, parents=False, exist_ok=True)
    st = os.lstat(path)
    if not (st.st_mode & 0o170000 == 0o040000):
        raise RuntimeError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise RuntimeError(f"{path} is owned by uid {st.st_uid}, not by us")
    os.chmod(path, 0o700)


def replace_private_file(path: Path, content: bytes) -> None:
    """Replace `path` by a 0600 file holding `content`: a reader (or a crash) sees the old
    or the new file, never half.

    O_EXCL|O_NOFOLLOW on the temp name: a planted symlink makes this fail, not follow.
    No fsync: rename is atomic against a daemon crash, and the runtime directory lives on
    tmpfs (/run) where a power loss takes the VMs with it anyway; fsync on the event loop
    cost a fifth of Spawn's own time on disk-backed directories (docs/performance.md).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_bytes(data: object) -> bytes:
    """How state.json is written (stable: sorted keys), replaced atomically with
    `replace_private_file` once state_seal has its fingerprint."""
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def write_json_atomic(path: Path, data: object) -> None:
    """A JSON file replaced atomically (`replace_private_file`)."""
    replace_private_file(path, json_bytes(data))


def read_json(path: Path) -> object:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd) as f:
        return json.load(f)


def bind_listening_socket(path: Path, mode: int) -> socket.socket:
    """Bind and listen on an AF_UNIX stream socket at `path` with `mode`.

    A stale socket at the path is replaced; anything else there (a planted symlink or
    file) makes bind fail rather than be followed.
    """
    check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
            else:  # bind() would say EADDRINUSE without naming what is in the way
                raise FileExistsError(errno.EEXIST, "refusing to bind over something that is not a socket", os.fspath(path))
        except FileNotFoundError:
            pass
        sock.bind(os.fspath(path))
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def write_private_file(path: Path, content: bytes) -> None:
    """A 0600 payload file (SMBIOS credentials, keys): created new, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
