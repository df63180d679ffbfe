# SPDX-License-Identifier: LGPL-2.1-or-later
"""A new user's first hour (issue #18): each mistake in, the message that names it out, a
non-zero exit, and the daemon still serving. The real vmspawnctl against a real daemon;
three tests boot the test guest (TCG), one lets QEMU refuse its arguments.

The parsing side of the same mistakes, without a daemon, is tests/unit/test_cli_mistakes.py.
"""

from __future__ import annotations

import os
import pty
import pwd
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.build import Guest
from tests.support import BOOT_TIMEOUT, Daemon, EventStream, no_leaks

pytestmark = pytest.mark.vm


def ctl(daemon: Daemon, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real vmspawnctl entry point against this daemon, from `cwd`."""
    env = dict(os.environ, VMSPAWN_ADDRESS=daemon.address)
    return subprocess.run(
        [sys.executable, "-m", "vmspawnctl.main", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def names(daemon: Daemon) -> set[str]:
    """Also proves the daemon still serves."""
    assert daemon.alive(), daemon.log()[-3000:]
    return {str(m["name"]) for m in daemon.call("List")["machines"]}


def boot_args(guest: Guest, name: str, *extra: str) -> list[str]:
    return ["start", "-M", name, "--kvm=no", "--ram=256M", f"--linux={guest.kernel}", f"--initrd={guest.initrd}", *extra]


def test_shutdown_all_with_nothing_running_says_so(daemon: Daemon) -> None:
    assert not names(daemon)
    result = ctl(daemon, "shutdown-all")
    assert result.returncode == 0, result
    assert result.stdout == "No VM is running: nothing to power off.\n", result


def test_a_machine_name_given_as_an_argument(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    """`start dwpos --kvm=no --linux=K`: vmspawn's parsing makes the rest kernel arguments and
    boots the working directory; the message says to use -M, and nothing starts."""
    with no_leaks(daemon):
        result = ctl(daemon, "start", "dwpos", "--kvm=no", f"--linux={guest.kernel}", cwd=tmp_path)
    assert result.returncode == 2, result
    first = result.stderr.splitlines()[0]
    assert first.startswith("vmspawnctl start: 'dwpos' looks like a machine name: use -M dwpos."), result.stderr
    assert "UKI" not in result.stderr
    assert "dwpos" not in names(daemon)


def test_initrd_without_linux(daemon: Daemon, guest: Guest, tmp_path: Path) -> None:
    with no_leaks(daemon):
        result = ctl(daemon, "start", "-M", "noinitrd", f"--initrd={guest.initrd}", cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == ["vmspawnctl start: --initrd needs --linux", "See 'vmspawnctl start --help'."]
    assert "noinitrd" not in names(daemon)


def test_no_image_option_says_the_current_directory_is_booted(daemon: Daemon, tmp_path: Path) -> None:
    """The notice comes before the failure it explains (an empty directory has no kernel)."""
    result = ctl(daemon, "start", cwd=tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert lines[0] == f"vmspawnctl: no -i/-D given: booting the current directory as -D . ({tmp_path})", lines
    assert "Failed to locate UKI" in lines[1], lines
    assert not names(daemon)


def test_bind_user_without_a_home_names_bind_user(daemon: Daemon, guest: Guest) -> None:
    """`--bind-user=nobody`: nobody's home does not exist. The error used to be about an
    invalid --bind, which was never given."""
    home = pwd.getpwnam("nobody").pw_dir
    if os.path.isdir(home):
        pytest.skip(f"nobody's home {home} exists on this host")
    with no_leaks(daemon):
        result = ctl(daemon, *boot_args(guest, "nohome", "--tpm=no", "--bind-user=nobody"))
    assert result.returncode == 1, result
    assert "--bind-user=nobody" in result.stderr and f"home directory {home} does not exist" in result.stderr, result.stderr
    assert "binds" not in result.stderr
    assert "nohome" not in names(daemon)


def test_qemu_refusing_its_arguments_is_shown_in_its_own_words(daemon: Daemon, guest: Guest) -> None:
    """QEMU's error line is the message, not only "QEMU exited with status 1" and a tail."""
    with no_leaks(daemon):
        result = ctl(daemon, *boot_args(guest, "badsmp", "--tpm=no", "--cpus=2,maxcpus=1"))
    assert result.returncode == 1, result
    first = result.stderr.splitlines()[0]
    assert first.startswith("vmspawnctl: failed to start ("), result.stderr
    assert "QEMU exited with status 1: qemu-system-" in first and "maxcpus" in first, result.stderr
    assert result.stderr.count("maxcpus must be") == 1, result.stderr  # not repeated by the tail
    assert "badsmp" not in names(daemon)


class Pty:
    """The reading end of a pseudo-terminal given to a child as its stderr."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.data = b""

    def read_until_exit(self, process: subprocess.Popen[str], timeout: float) -> None:
        os.close(self.slave)
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                process.kill()
                raise AssertionError(f"no end within {timeout}s; got {self.data!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the child side is closed
                chunk = b""
            if not chunk:
                break
            self.data += chunk
        process.wait(timeout=timeout)
        os.close(self.master)


def test_running_vm_remove_stop_and_the_starting_event(daemon: Daemon, guest: Guest) -> None:
    """The guest ignores the ACPI power button, so `stop` waits out its deadline: on a
    terminal it shows that it is waiting and for how long, never silently."""
    name = "hour"
    with EventStream(daemon) as events:  # all VMs: "hour" does not exist yet
        started = ctl(daemon, *boot_args(guest, name, "--tpm=no", "vmspawnd_test.mode=ignore-acpi"))
        assert started.returncode == 0, started
        first = events.wait_event(name, "StateChanged")
        assert first["data"]["state"] == "starting", events.seen
        events.wait_state(name, "running")
    try:
        removed = ctl(daemon, "remove", name)
        assert removed.returncode == 1, removed
        assert f"stop it first (vmspawnctl stop {name}" in removed.stderr, removed.stderr
        assert name in names(daemon)

        terminal = Pty()
        env = dict(os.environ, VMSPAWN_ADDRESS=daemon.address)
        stop = subprocess.Popen(
            [sys.executable, "-m", "vmspawnctl.main", "stop", name, "--deadline=3"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal.slave,
            text=True,
        )
        terminal.read_until_exit(stop, BOOT_TIMEOUT)
        assert stop.returncode == 0, terminal.data
        assert stop.stdout is not None and stop.stdout.read().startswith(f"{name}: stopped"), terminal.data
        progress = terminal.data.decode()
        assert f"{name}: waiting for the guest to power off (ACPI power button)… 0s, terminating it after 3s" in progress, (
            progress
        )
        assert "1s, terminating it after 3s" in progress, progress  # it counts
        assert progress.endswith("\r\x1b[K"), progress  # and clears its line at the end
    finally:
        ctl(daemon, "terminate", name)
        ctl(daemon, "remove", name)
    assert name not in names(daemon)


def test_log_of_a_gui_vm_says_why_it_is_empty(daemon: Daemon, guest: Guest) -> None:
    name = "guilog"
    started = ctl(daemon, *boot_args(guest, name, "--tpm=no", "--console=gui", "vmspawnd_test.mode=wait"))
    assert started.returncode == 0, started
    try:
        for follow in ([], ["-f"]):
            result = ctl(daemon, "log", name, *follow)
            assert result.returncode == 1, result
            assert result.stdout == ""
            assert result.stderr == (
                f"vmspawnctl: {name} has no console, so no console history: a --console=gui VM "
                f"shows its output on its display (vmspawnctl screenshot {name} FILE)\n"
            ), result.stderr
    finally:
        ctl(daemon, "terminate", name)
        ctl(daemon, "remove", name)
    assert name not in names(daemon)
