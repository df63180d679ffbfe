# SPDX-License-Identifier: LGPL-2.1-or-later
"""Stand-ins for fast seam tests: the fake QEMU (fake_qemu.py) and what a VM spec needs
around it (a kernel file, a firmware descriptor), so that a VM "boots" without a guest,
without OVMF and without QEMU installed.

Only for tests/component: the real QEMU and guest are tested by the `vm` and `qemu` tiers.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from vmspawnd.spec.discovery import native_arch

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")
MIB = 1024 * 1024


def install_fake_qemu(bin_dir: Path) -> Path:
    """Put the fake into `bin_dir` as `qemu`, the first name vmspawnd looks for in $PATH.

    A shell wrapper that execs this interpreter (the QEMU pid stays the wrapper's pid):
    the reaper execs it like any QEMU binary. -I -S: stdlib only, fast start.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "qemu"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(FAKE_QEMU))} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def write_firmware_descriptor(directory: Path) -> Path:
    """A firmware descriptor (without Secure Boot) for `--firmware=`: no OVMF needed, and
    the VM does not depend on what the host's firmware directories hold."""
    directory.mkdir(parents=True, exist_ok=True)
    code = directory / "FAKE_CODE.fd"
    code.write_bytes(b"")
    descriptor = directory / "fake-firmware.json"
    descriptor.write_text(
        json.dumps(
            {
                "description": "fake UEFI firmware for fake-QEMU tests",
                "interface-types": ["uefi"],
                "mapping": {
                    "device": "flash",
                    "executable": {"filename": str(code), "format": "raw"},
                    "nvram-template": {"filename": str(directory / "FAKE_VARS.fd"), "format": "raw"},
                },
                "targets": [{"architecture": native_arch(), "machines": ["*"]}],
                "features": [],
                "tags": [],
            }
        )
    )
    return descriptor


def fake_vm_spec(root: Path, name: str, *faults: str, **fields: object) -> dict[str, object]:
    """The wire form of a VM spec the fake QEMU runs: direct kernel boot of a dummy file,
    no KVM, vsock, TPM, SSH key or registration (nothing the fake does not stand in for).

    `faults` are fake_qemu.py's markers without the prefix, e.g. "hang=cont"; `fields`
    override or add spec fields (camelCase, as on the wire).
    """
    kernel = root / "vmlinuz"
    if not kernel.exists():
        kernel.write_bytes(b"not a kernel: the fake QEMU never reads it")
    firmware = root / "firmware" / "fake-firmware.json"
    if not firmware.exists():
        write_firmware_descriptor(firmware.parent)
    spec: dict[str, object] = {
        "name": name,
        "linux": str(kernel),
        "firmware": str(firmware),
        "kvm": False,
        "vsock": False,
        "tpm": False,
        "passSshKey": False,
        "register": False,
        "ram": 64 * MIB,
        "console": "read-only",
        "kernelCmdline": [f"fakeqemu.{fault}" for fault in faults],
    }
    spec.update(fields)
    return spec


class FakeQemuProcess:
    """The fake started directly (no daemon, no reaper) on sockets bound here, as vmspawnd
    binds them: for tests of the QMP session and the console hub alone."""

    def __init__(
        self, root: Path, *faults: str, console: bool = False, prelaunch: bool = True, program: list[str] | None = None
    ) -> None:
        """`program` replaces the fake (e.g. the real QEMU with the options it needs in
        addition, for tests that hold the two to the same behaviour)."""
        self.qmp_path = root / "qmp"
        self.console_path = root / "console"
        self.console_log = root / "console.log"
        self.stderr_path = root / "qemu.log"
        listeners = [self._listen(self.qmp_path)]
        program = program or [sys.executable, "-I", "-S", str(FAKE_QEMU)]
        argv = [
            *program,
            *(["-S"] if prelaunch else []),
            "-chardev",
            f"socket,id=vmspawn-qmp,fd={listeners[0].fileno()},server=on,wait=off",
            "-mon",
            "chardev=vmspawn-qmp,mode=control",
        ]
        if console:
            listeners.append(self._listen(self.console_path))
            argv += [
                "-chardev",
                f"socket,id=console,fd={listeners[1].fileno()},server=on,wait=off,logfile={self.console_log},logappend=on",
                "-device",
                "virtconsole,chardev=console",
            ]
        if faults:
            argv += ["-append", " ".join(f"fakeqemu.{fault}" for fault in faults)]
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                argv, pass_fds=[s.fileno() for s in listeners], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        for listener in listeners:
            listener.close()  # the fake holds them now, as QEMU does

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(8)
        return sock

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self, signo: int = signal.SIGKILL) -> int:
        """Send `signo` and reap: the exit status (negative: the signal it died of)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signo)
        return self.process.wait(timeout=30)


@contextlib.contextmanager
def fake_qemu_process(
    root: Path, *faults: str, console: bool = False, prelaunch: bool = True, program: list[str] | None = None
) -> Iterator[FakeQemuProcess]:
    """A FakeQemuProcess that is killed and reaped at the end, whatever happened."""
    fake = FakeQemuProcess(root, *faults, console=console, prelaunch=prelaunch, program=program)
    try:
        yield fake
    finally:
        if fake.process.poll() is None:
            fake.kill()
