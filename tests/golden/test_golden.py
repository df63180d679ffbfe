# SPDX-License-Identifier: LGPL-2.1-or-later
"""Golden QEMU command lines (libvirt's style): one argv element per line per scenario.

`VMSPAWND_REGENERATE=1` rewrites the generated goldens (review them as a diff); the
hand-written ones (scenarios.HAND_WRITTEN) are never rewritten. Every golden is also
launched by the real QEMU with `-S` and must reach QMP status `prelaunch`, which catches
options this QEMU does not have; those launches are marked `qemu` (they need QEMU and the
test guest's kernel), so a bare `pytest` checks the argv only (tests/README.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.golden.scenarios import HAND_WRITTEN, SCENARIOS
from tests.guest.build import Guest
from tests.support import children_of
from vmspawnd.qemu.command import build_qemu_command
from vmspawnd.qemu.handover import open_tap

HERE = Path(__file__).parent
REGENERATE = os.environ.get("VMSPAWND_REGENERATE") == "1"
QEMU = shutil.which("qemu-system-x86_64")


def _golden(name: str) -> Path:
    return HERE / f"{name}.args"


def test_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 40
    assert len(HAND_WRITTEN) >= 10
    assert HAND_WRITTEN <= SCENARIOS.keys()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden(name: str) -> None:
    spec, res = SCENARIOS[name]
    spec.validate()
    argv = build_qemu_command(spec, res).argv
    text = "".join(arg + "\n" for arg in argv)
    path = _golden(name)
    if REGENERATE and name not in HAND_WRITTEN:
        path.write_text(text)
    assert path.exists(), f"{path.name} missing; run with VMSPAWND_REGENERATE=1"
    assert path.read_text() == text


def test_no_stray_goldens() -> None:
    assert {p.stem for p in HERE.glob("*.args")} == set(SCENARIOS)


# --- launching with the real QEMU ---------------------------------------------------------


def _opt_value(opts: str, key: str) -> str | None:
    """Value of key= in a QemuOpts string (",," is an escaped comma)."""
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(opts):
        if opts[i] == ",":
            if opts[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += opts[i]
        i += 1
    parts.append(cur)
    for part in parts:
        k, sep, v = part.partition("=")
        if sep and k == key:
            return v
    return None


class _Launch:
    """Map /GOLDEN placeholders to real files, sockets and helper processes."""

    def __init__(self, root: Path, guest: Guest) -> None:
        self.root = root
        self.guest = guest
        self.helpers: list[subprocess.Popen[bytes]] = []
        self.socks: list[socket.socket] = []
        self.fds: list[int] = []  # what the daemon would open for a confined QEMU (-add-fd, TAP)

    def real(self, path: str) -> Path:
        return Path(path.replace("/GOLDEN", str(self.root), 1))

    def touch(self, path: str, size: int = 1 << 20) -> None:
        p = self.real(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(size)

    def prepare(self, name: str, argv: list[str], files: dict[str, bytes]) -> tuple[list[str], list[int], Path]:
        out: list[str] = []
        fds: list[int] = []
        qmp_path = self.root / "qmp.sock"
        for path, content in files.items():
            p = self.real(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
        # -add-fd: a set of two fds is read-write + read-only (a file QEMU writes), one is read-only.
        set_sizes: dict[str | None, int] = {}
        for before, arg in zip(argv, argv[1:], strict=False):
            if before == "-add-fd":
                set_sizes[_opt_value(arg, "set")] = set_sizes.get(_opt_value(arg, "set"), 0) + 1
        seen: dict[str | None, int] = {}
        prev = ""
        for arg in argv:
            if prev == "-add-fd":
                fdset = _opt_value(arg, "set")
                seen[fdset] = seen.get(fdset, 0) + 1
                writable = set_sizes[fdset] == 2 and seen[fdset] == 1
                fd = self._open_for_fdset(_opt_value(arg, "opaque") or "", writable)
                fds.append(fd)
                arg = arg.replace(f"fd={_opt_value(arg, 'fd')},", f"fd={fd},", 1)
            elif prev == "-netdev" and arg.startswith("tap,fd="):
                fd = open_tap(f"gold{os.getpid() % 100000}")
                self.fds.append(fd)
                fds.append(fd)
                arg = arg.replace(f"fd={_opt_value(arg, 'fd')},", f"fd={fd},", 1)
            elif prev == "-kernel":
                p = self.real(arg)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.symlink_to(self.guest.kernel)
            elif prev == "-initrd":
                p = self.real(arg)
                p.parent.mkdir(parents=True, exist_ok=True)
                if not p.exists():
                    p.symlink_to(self.guest.initrd)
            elif prev == "-drive" and "if=pflash" in arg and "readonly=on" not in arg:
                p = self.real(_opt_value(arg, "file") or "")
                p.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", p)
            elif prev == "-drive" and "if=none" in arg:
                self.touch(_opt_value(arg, "file") or "")
            elif prev == "-blockdev":
                self.touch(_opt_value(arg, "file.filename") or "")
            elif prev == "-chardev" and arg.startswith("socket,id=vmspawn-qmp,fd="):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(str(qmp_path))
                sock.listen(1)
                self.socks.append(sock)
                fds.append(sock.fileno())
                arg = arg.replace("fd=3,", f"fd={sock.fileno()},")
            elif prev == "-chardev" and arg.startswith("socket,id=console,fd="):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.real(_opt_value(arg, "logfile") or "").parent.mkdir(parents=True, exist_ok=True)
                sock.bind(str(self.root / "console.sock"))
                sock.listen(1)
                self.socks.append(sock)
                fds.append(sock.fileno())
                arg = arg.replace("fd=4,", f"fd={sock.fileno()},")
            elif prev == "-chardev" and arg.startswith("socket,id=chrtpm,"):
                self._swtpm(self.real(_opt_value(arg, "path") or ""))
            elif prev == "-chardev" and arg.startswith("socket,id="):
                self._virtiofsd(self.real(_opt_value(arg, "path") or ""))
            elif prev == "-vnc" and arg.startswith("unix:"):
                self.real(arg.removeprefix("unix:")).parent.mkdir(parents=True, exist_ok=True)
            elif prev == "-accel" and arg == "kvm":
                arg = "tcg"  # KVM is not usable on this host
            out.append(arg.replace("/GOLDEN", str(self.root)))
            prev = arg
        if "-vga" in out and "-display" not in out:
            out += ["-display", "none"]
        return out, fds, qmp_path

    def _open_for_fdset(self, opaque: str, writable: bool) -> int:
        """The file an -add-fd names, made real as the daemon would have it, opened as QEMU expects."""
        path = self.real(opaque)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.name == "efi-vars.fd":
                shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", path)
            else:
                self.touch(opaque)
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.fds.append(fd)
        return fd

    def _wait_for_socket(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        import time

        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None, f"helper for {path} exited: {proc.stderr.read() if proc.stderr else ''!r}"
            assert time.monotonic() < deadline, f"helper for {path} never listened"
            time.sleep(0.02)  # no inotify in the stdlib; bounded poll for a helper's socket

    def _swtpm(self, sock: Path) -> None:
        state = self.root / "tpmstate"
        state.mkdir(exist_ok=True)
        sock.parent.mkdir(parents=True, exist_ok=True)
        listen = self.root / "swtpm.sock"  # swtpm's own option syntax has no comma escape
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl", f"type=unixio,path={listen}"],
            stderr=subprocess.PIPE,
        )
        self.helpers.append(proc)
        self._wait_for_socket(listen, proc)
        if sock != listen:
            sock.symlink_to(listen)

    def _virtiofsd(self, sock: Path) -> None:
        shared = self.root / ("share-" + sock.name)
        shared.mkdir(exist_ok=True)
        sock.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            ["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o", f"source={shared}", "-o", "cache=none"],
            stderr=subprocess.PIPE,
        )
        self.helpers.append(proc)
        self._wait_for_socket(sock, proc)

    def close(self) -> None:
        for proc in self.helpers:
            # As vmspawnd's stop_helper: virtiofsd's sandbox worker first, so the process we
            # started reaps it (a worker orphaned to a non-reaping PID 1 stays a zombie).
            workers = children_of(proc.pid)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if not workers:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
        for sock in self.socks:
            sock.close()
        for fd in self.fds:
            os.close(fd)


def _qmp_status(path: Path, qemu: subprocess.Popen[bytes]) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(path))
        f = s.makefile("rwb")
        try:
            json.loads(f.readline())  # greeting
            f.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    raise AssertionError(f"QEMU closed QMP: {qemu.wait() and qemu.stderr.read() if qemu.stderr else ''!r}")
                msg = json.loads(line)
                if isinstance(msg.get("return"), dict) and "status" in msg["return"]:
                    return str(msg["return"]["status"])
        finally:
            f.close()


UNLAUNCHABLE = {
    "vsock": "no /dev/vhost-vsock on this host (vhostfd= needs a real vhost-vsock fd)",
    "extra-drive-block-device": "needs a real block device",
    "aarch64": "the golden is for qemu-system-aarch64",
}


@pytest.mark.qemu
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_launches(name: str, guest: Guest) -> None:
    if name in UNLAUNCHABLE:
        pytest.skip(UNLAUNCHABLE[name])
    spec, res = SCENARIOS[name]
    argv = _golden(name).read_text().splitlines()
    files = build_qemu_command(spec, res).files
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        launch = _Launch(Path(tmp), guest)
        try:
            real_argv, fds, qmp_path = launch.prepare(name, argv, files)
            assert QEMU is not None  # the skipif above
            real_argv[0] = QEMU
            qemu = subprocess.Popen(
                real_argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                status = _qmp_status(qmp_path, qemu)
            finally:
                qemu.kill()
                _, err = qemu.communicate()
            assert status == "prelaunch", err.decode(errors="replace")
        finally:
            launch.close()
