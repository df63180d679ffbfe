# SPDX-License-Identifier: LGPL-2.1-or-later
"""A Debian tree booted with ``systemd-nspawn -b``: systemd as PID 1, dbus, machined.

How it is started, and why (docs/reference/systemd-container.md has the measurements):

* The cached tree is never written: the container's root is an overlayfs over it, with the
  upper layer in a temporary directory that goes away with the container.
* nspawn runs in a private mount namespace (``unshare -m``) in which the overlay, a tmpfs over
  /run/systemd/nspawn (nspawn's scratch space on the host) and, on hybrid-cgroup hosts, the
  cgroup2 mount bound over /sys/fs/cgroup are made. So every mount dies with nspawn, even if
  the test process is killed; and nspawn sees a pure cgroup2 host, which systemd >= 258 needs
  ("Detected host uses legacy cgroup v1 hierarchy, refusing") and older ones accept. The
  host's nspawn (252 on bookworm) boots both trixie (257) and forky (262) this way.
* It starts from a cgroup of its own (cgroups.py), since no systemd on the host gives it one.
* ``--notify-ready=yes`` with a NOTIFY_SOCKET of ours: nspawn reports READY=1 once the
  container's systemd has finished starting up, and the leader's pid (X_NSPAWN_LEADER_PID),
  so booting waits on events, not on a poll.
* Commands go in with ``nsenter -t LEADER -a -r -w``: without -r -w, systemctl inside says
  "offline" (nspawn enters its root by MS_MOVE + chroot, not pivot_root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tests.system import cgroups, hostenv
from vmspawnd import override

BOOT_TIMEOUT = 120.0  # measured: ~2 s to READY=1 on this machine
RUN_TIMEOUT = 120.0
POWEROFF_TIMEOUT = 90.0  # vmspawnd-guests.service powers VMs off at shutdown, ACPI first
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as the launcher: put itself into the container's cgroups, make the container's mounts
# in its (private) mount namespace, then become systemd-nspawn.
_LAUNCHER = r"""
set -eu
echo $$ > "$CG_NSPAWN/cgroup.procs"
if [ -n "$CG_V1" ]; then echo $$ > "$CG_V1/cgroup.procs"; fi
mount -t overlay overlay -o "lowerdir=$TREE,upperdir=$WORK/upper,workdir=$WORK/overlay-work" "$WORK/root"
mkdir -p /run/systemd/nspawn
mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn
if [ -n "$CG2_OVER_SYS_FS_CGROUP" ]; then mount --bind "$CG2_OVER_SYS_FS_CGROUP" /sys/fs/cgroup; fi
exec systemd-nspawn "$@"
"""

# Ends the container when its stdin reaches EOF: when the test process closes the pipe at the
# end of teardown (then the cgroup is gone already and it does nothing), or when it dies
# (SIGKILL, OOM) before its teardown could run. nspawn's death alone does not end a container:
# its systemd is reparented to the host's PID 1 and runs on. Then it also removes the cgroups
# ($0, $1) and the overlay's directories ($2): the mounts died with the mount namespace. The
# wait for the cgroup to empty is a poll, as a shell has no poll(2) for cgroup.events.
_WATCHDOG = r"""
read -r _ || true
[ -e "$0/cgroup.kill" ] || exit 0
echo 1 > "$0/cgroup.kill"
i=0
while ! grep -q '^populated 0' "$0/cgroup.events" && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
find "$0" ${1:+"$1"} -depth -type d -exec rmdir {} + 2>/dev/null
rmdir "${0%/*}" ${1:+"${1%/*}"} 2>/dev/null
rm -rf "$2"
"""

# Moves the command into the container's exec cgroup (so that cgroup.kill at teardown also
# ends whatever a command left running), then execs it.
_INTO_CGROUP = 'echo $$ > "$0" && exec "$@"'


class CommandFailed(subprocess.CalledProcessError):
    """A command inside the container exited non-zero; the message carries its output."""

    @override
    def __str__(self) -> str:
        return f"{super().__str__()}\n{_outputs(self.stdout, self.stderr)}"


class CommandTimedOut(subprocess.TimeoutExpired):
    """A command inside the container did not finish in time (it was killed)."""

    @override
    def __str__(self) -> str:
        return f"{super().__str__()}\n{_outputs(self.output, self.stderr)}"


class BootFailed(RuntimeError):
    """The container did not come up; the message ends with nspawn's output."""


def _outputs(stdout: object, stderr: object) -> str:
    def tail(text: object) -> str:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        lines = str(text or "").splitlines()
        return "\n".join(lines[-60:])

    return f"--- stdout ---\n{tail(stdout)}\n--- stderr ---\n{tail(stderr)}"


@dataclasses.dataclass(frozen=True)
class Bind:
    """A host path made visible inside (nspawn --bind / --bind-ro)."""

    source: Path
    target: str | None = None  # default: the same path inside
    read_only: bool = True

    def option(self) -> str:
        target = self.target or str(self.source)
        return f"--bind{'-ro' if self.read_only else ''}={self.source}:{target}"


class Container:
    """One booted container. Make it with `boot()`; end it with `poweroff()` (always, in a
    finally: it also kills what is left and removes the cgroups and the overlay)."""

    _units = itertools.count(1)

    def __init__(
        self,
        name: str,
        suite: str,
        tree: Path,
        workdir: Path,
        process: subprocess.Popen[bytes],
        cgroup: Path,
        cgroup_v1: Path | None,
        watchdog: subprocess.Popen[bytes],
    ) -> None:
        self.name = name
        self.suite = suite
        self.tree = tree
        self.workdir = workdir
        self.process = process
        self.cgroup = cgroup
        self.cgroup_v1 = cgroup_v1
        self.watchdog = watchdog
        self.leader = 0
        self.state = ""  # what `systemctl is-system-running --wait` said at boot
        self.boot_seconds = 0.0
        self._closed = False

    @property
    def log_path(self) -> Path:
        """nspawn's output: the container's console (--console=passive)."""
        return self.workdir / "nspawn.log"

    def console_log(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- running things inside -------------------------------------------------------------

    def _enter(self, argv: Sequence[str], user: str | None, cwd: str | None, env: Mapping[str, str] | None) -> list[str]:
        environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", **(env or {})}
        command = ["env", "-i", *(f"{k}={v}" for k, v in environment.items())]
        if cwd is not None:
            command[1:1] = [f"--chdir={cwd}"]
        if user is not None and user != "root":
            # runuser sets HOME, USER, LOGNAME and SHELL for the target user.
            command += ["runuser", "-u", user, "--"]
        return [
            "sh",
            "-c",
            _INTO_CGROUP,
            str(self.cgroup / "exec" / "cgroup.procs"),
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "-r",
            "-w",
            *command,
            *argv,
        ]

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = RUN_TIMEOUT,
        input: str | bytes | None = None,
        user: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside with nsenter: an argv, or a string for `bash -c`.

        The command runs with a clean environment (PATH, HOME, LANG, plus `env`) as root, or
        as `user`. It is no unit: systemd inside does not see it (use `unit_run` for that).
        Raises CommandFailed (non-zero exit, with `check`) or CommandTimedOut; either way the
        message has the output.
        """
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return _communicate(self._enter(argv, user, cwd, env), argv, check=check, timeout=timeout, input=input)

    def unit_run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = RUN_TIMEOUT,
        input: str | bytes | None = None,
        user: str = "root",
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        properties: Iterable[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as a transient service inside (`systemd-run --wait --pipe --collect`):
        in its own cgroup, with a service's environment, the way an administrator's command
        or a unit would run. A string goes through `bash -c` (systemd-run does not resolve a
        relative program against WorkingDirectory=). On a timeout the unit is stopped.
        """
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        unit = f"vmspawnd-test-{next(self._units)}-{os.getpid()}.service"
        # User= makes systemd set HOME, USER, LOGNAME and SHELL, as a login would.
        run = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", f"--unit={unit}", "-p", f"User={user}"]
        if cwd is not None:
            run += ["-p", f"WorkingDirectory={cwd}"]
        for key, value in (env or {}).items():
            run.append(f"--setenv={key}={value}")
        for prop in properties:
            run += ["-p", prop]
        try:
            return _communicate(
                self._enter([*run, "--", *argv], None, None, None), argv, check=check, timeout=timeout, input=input
            )
        except CommandTimedOut:
            self.run(["systemctl", "stop", unit], check=False, timeout=60)
            raise

    # --- looking inside --------------------------------------------------------------------

    def path(self, path: str) -> Path:
        """The host path of `path` inside, through /proc/LEADER/root: for host-side clients
        (sockets, files to read). Absolute symlinks inside resolve against the host's root on
        this path, so name real directories (/run/..., not /var/run/...)."""
        return Path(f"/proc/{self.leader}/root") / path.lstrip("/")

    def cursor(self) -> str:
        """The journal's current position, for `journal(since_cursor=...)`."""
        out = self.run(["journalctl", "-q", "-n", "1", "-o", "json"]).stdout
        return str(json.loads(out.splitlines()[-1])["__CURSOR"])

    def journal(self, unit: str | None = None, *, since_cursor: str | None = None, lines: int | None = None) -> str:
        """The journal inside (of one unit, after a cursor, the last `lines`), as text."""
        argv = ["journalctl", "--no-pager", "-q", "-o", "short-precise"]
        if unit is not None:
            argv += ["-u", unit]
        if since_cursor is not None:
            argv.append(f"--after-cursor={since_cursor}")
        if lines is not None:
            argv += ["-n", str(lines)]
        return self.run(argv, timeout=60).stdout

    def failed_units(self) -> list[str]:
        out = self.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"], check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    # --- copying in ------------------------------------------------------------------------

    def copy_in(self, source: Path, dest: str, files: Iterable[str] | None = None) -> None:
        """Copy `source` (a file, or a directory: all of it or the relative `files`) to `dest`
        inside, owned by root. Goes through tar inside, never through path(): writing through
        /proc/PID/root would follow absolute symlinks to the host."""
        buffer = io.BytesIO()

        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        with tarfile.open(fileobj=buffer, mode="w") as tar:
            if source.is_dir() and files is not None:
                for name in files:
                    tar.add(source / name, arcname=name, recursive=False, filter=as_root)
            elif source.is_dir():
                tar.add(source, arcname=".", filter=as_root)
            else:
                tar.add(source, arcname=Path(dest).name, filter=as_root)
                dest = str(Path(dest).parent)
        self.run(["mkdir", "-p", dest])
        self.run(["tar", "-x", "-C", dest], input=buffer.getvalue(), timeout=300)

    # --- the end ---------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def poweroff(self, timeout: float = POWEROFF_TIMEOUT) -> None:
        """`systemctl poweroff` inside, wait for nspawn to exit and reap it; then kill what is
        left (on a timeout: everything), remove the cgroups and the overlay's directories.
        Safe to call more than once, and after a failed boot."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.alive() and self.leader:
                with contextlib.suppress(CommandFailed, CommandTimedOut):
                    # Returns at once (or fails as the bus goes away): the waiting is below.
                    self.run(["systemctl", "poweroff"], check=False, timeout=30)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    warnings.warn(f"container {self.name} did not power off within {timeout:g}s; killed", stacklevel=2)
        finally:
            try:
                _end(self.process, self.cgroup, self.cgroup_v1)
                shutil.rmtree(self.workdir, ignore_errors=True)
            finally:
                # Its cgroup is gone: EOF makes it exit without doing anything.
                assert self.watchdog.stdin is not None
                self.watchdog.stdin.close()
                self.watchdog.wait()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *_: object) -> None:
        self.poweroff()


def _end(process: subprocess.Popen[bytes], cgroup: Path, cgroup_v1: Path | None) -> None:
    """Kill whatever still runs in the container's cgroup, reap nspawn (the host's PID 1 would
    not), and remove the groups depth-first."""
    cgroups.kill(cgroup)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # Not in its cgroup any more? It must still end, and be reaped.
        process.kill()
        process.wait()
    if not cgroups.wait_empty(cgroup, 30):
        raise RuntimeError(f"processes left in {cgroup} after SIGKILL: {cgroups.procs(cgroup)}")
    cgroups.remove(cgroup)
    if cgroup_v1 is not None:
        cgroups.wait_empty(cgroup_v1, 10)
        cgroups.remove(cgroup_v1)


def _communicate(
    argv: list[str], shown: Sequence[str], *, check: bool, timeout: float, input: str | bytes | None
) -> subprocess.CompletedProcess[str]:
    """Run argv in a session of its own, so a timeout kills nsenter and what it forked."""
    data = input.encode() if isinstance(input, str) else input
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise CommandTimedOut(list(shown), timeout, output=out, stderr=err) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if check and process.returncode != 0:
        raise CommandFailed(process.returncode, list(shown), stdout, stderr)
    return subprocess.CompletedProcess(list(shown), process.returncode, stdout, stderr)


def boot(tree: Path, name: str, *, suite: str = "", binds: Iterable[Bind] = (), timeout: float = BOOT_TIMEOUT) -> Container:
    """Boot `tree` (unchanged: an overlay goes over it) as container `name` and wait until its
    systemd has finished starting up. `running` or `degraded` (failed units are warned about)
    is accepted; anything else, or no READY=1 in time, fails with the console output."""
    started = time.monotonic()
    if any(c in str(tree) for c in ",:\\"):
        raise BootFailed(f"overlayfs cannot take {tree} as a lower directory (',', ':' or '\\' in it)")
    layout = hostenv.cgroup_layout()
    # The pid in the name lets a later run find what a killed one left (conftest.system_tier).
    workdir = Path(tempfile.mkdtemp(prefix=f"vmspawnd-system-{name}-{os.getpid()}-"))
    for sub in ("upper", "overlay-work", "root"):
        (workdir / sub).mkdir()
    cgroup, cgroup_v1 = cgroups.make(layout, name)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(str(workdir / "notify"))
    resolv = Bind(Path("/etc/resolv.conf").resolve(), "/etc/resolv.conf")
    nspawn = [
        "-D",
        str(workdir / "root"),
        "-b",
        "-M",
        name,
        "--register=no",
        "--keep-unit",
        "--console=passive",
        "--resolv-conf=off",
        "--link-journal=no",
        "--notify-ready=yes",
        *(b.option() for b in (resolv, *binds)),
    ]
    env = {
        "PATH": PATH,
        "LANG": "C.UTF-8",
        "NOTIFY_SOCKET": str(workdir / "notify"),
        "TREE": str(tree),
        "WORK": str(workdir),
        "CG_NSPAWN": str(cgroup / "nspawn"),
        "CG_V1": str(cgroup_v1 or ""),
        "CG2_OVER_SYS_FS_CGROUP": str(layout.unified) if layout.hybrid else "",
    }
    # Outside the container's cgroup (it kills that), in a session of its own (a Ctrl-C to the
    # terminal's process group must leave it to the teardown).
    watchdog = subprocess.Popen(
        ["sh", "-c", _WATCHDOG, str(cgroup), str(cgroup_v1 or ""), str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with open(workdir / "nspawn.log", "wb") as log:
            process = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", _LAUNCHER, "launcher", *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
    except BaseException:
        notify.close()
        assert watchdog.stdin is not None
        watchdog.stdin.close()
        watchdog.wait()
        cgroups.remove(cgroup)
        if cgroup_v1 is not None:
            cgroups.remove(cgroup_v1)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    container = Container(name, suite, tree, workdir, process, cgroup, cgroup_v1, watchdog)
    try:
        container.leader = _wait_ready(process, notify, timeout, container)
        state = container.run(
            ["systemctl", "is-system-running", "--wait"], check=False, timeout=max(10.0, timeout - (time.monotonic() - started))
        ).stdout.strip()
        container.state = state
        if state == "degraded":
            warnings.warn(f"container {name} booted degraded; failed units: {container.failed_units()}", stacklevel=2)
        elif state != "running":
            raise BootFailed(
                f"container {name}: systemctl is-system-running says {state!r}; failed units: "
                f"{container.failed_units()}\n{container.console_log()}"
            )
    except BaseException:
        container.poweroff(timeout=30)
        raise
    finally:
        notify.close()
    container.boot_seconds = time.monotonic() - started
    return container


def _wait_ready(process: subprocess.Popen[bytes], notify: socket.socket, timeout: float, container: Container) -> int:
    """Wait for nspawn's READY=1 (the container's systemd is up) and return the leader's pid.
    nspawn exiting first (a pidfd becomes readable) fails at once."""
    pidfd = os.pidfd_open(process.pid)
    leader = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootFailed(
                    f"container {container.name}: no READY=1 from nspawn within {timeout:g}s\n{container.console_log()}"
                )
            readable, _, _ = select.select([notify.fileno(), pidfd], [], [], remaining)
            if pidfd in readable and notify.fileno() not in readable:
                raise BootFailed(
                    f"container {container.name}: systemd-nspawn exited with status {process.wait()}\n{container.console_log()}"
                )
            if notify.fileno() in readable:
                fields = dict(line.partition("=")[::2] for line in notify.recv(4096).decode().splitlines())
                if "X_NSPAWN_LEADER_PID" in fields:
                    leader = int(fields["X_NSPAWN_LEADER_PID"])
                if fields.get("READY") == "1":
                    if not leader:
                        raise BootFailed(f"container {container.name}: READY=1 without X_NSPAWN_LEADER_PID")
                    return leader
    finally:
        os.close(pidfd)
