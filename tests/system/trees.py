# SPDX-License-Identifier: LGPL-2.1-or-later
"""Debian trees for the system tier: debootstrap + the packages vmspawnd and the tests need,
built once per recipe and cached in ``~/.cache/vmspawnd-tests/system/<suite>-<hash>``.

The hash covers the recipe (suite, package lists — scripts/lib.sh's included —, masked
units, the host CA certificates copied in) and this file, so a changed package list or
build step rebuilds. A tree is built in a temporary directory beside its final place and
renamed into place when complete: a visible tree is always whole. Containers never write to
a cached tree (container.py boots an overlay over it).

Every step that mounts something (debootstrap itself, and each chroot) runs in a private mount
namespace (``unshare -m``), so a build that fails or is killed leaves no mount behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from tests.guest.build import cache_root
from tests.system import hostenv

REPO_ROOT = Path(__file__).resolve().parents[2]
LIB_SH = REPO_ROOT / "scripts" / "lib.sh"


@dataclasses.dataclass(frozen=True)
class Suite:
    """A Debian release the tier runs on."""

    name: str
    # debootstrap ships no script for releases newer than itself: testing uses sid's.
    debootstrap_script: str | None = None
    # Testing's Release files may look expired against this machine's clock.
    check_valid_until: bool = True


SUITES: dict[str, Suite] = {
    "trixie": Suite("trixie"),  # systemd 257
    "forky": Suite("forky", debootstrap_script="/usr/share/debootstrap/scripts/sid", check_valid_until=False),  # 262
}

# What the tests themselves need inside, besides scripts/lib.sh's list (which scripts/install
# would otherwise apt-get at test time).
TIER_PACKAGES = (
    "systemd-container",  # machinectl, systemd-machined
    "dbus-user-session",
    "libpam-systemd",
    "iproute2",
    "procps",  # pgrep, for assertions inside
    "ca-certificates",
    "qemu-system-x86",
    "qemu-utils",
    "ovmf",
    "swtpm",
    "swtpm-tools",
    "virtiofsd",
    "python3-venv",
    "systemd-journal-remote",
    "man-db",  # man finds the pages scripts/install installs
    "bash-completion",  # and bash loads its completion
)

# Nothing in a test container may fight the host for its consoles, network or clock (the
# container shares the host's network namespace).
MASKED_UNITS = (
    "getty@.service",
    "console-getty.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
)

BUILD_TIMEOUT = 900.0
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
# Only while building: no daemon may start in the chroot, and dpkg need not fsync (a failed
# build is thrown away anyway). Both are removed before the tree is published.
POLICY_RC_D = "usr/sbin/policy-rc.d"
UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/vmspawnd-tests-unsafe-io"


class TreeBuildError(RuntimeError):
    """A tree could not be built; the message ends with the tail of the build log."""


def lib_sh_packages(suite: str) -> list[str]:
    """scripts/lib.sh's package list for `suite`, as scripts/install computes it there."""
    out = subprocess.run(
        ["bash", "-c", '. "$1" && vmspawnd_system_packages "$2"', "bash", str(LIB_SH), suite],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.split()


def recipe(suite: Suite) -> dict[str, object]:
    """Everything that shapes a tree; its hash names the cache entry."""
    return {
        "suite": dataclasses.asdict(suite),
        "packages": sorted(set(TIER_PACKAGES) | set(lib_sh_packages(suite.name))),
        "masked": list(MASKED_UNITS),
        "ca": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in hostenv.ca_certificates()},
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }


def tree_key(spec: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def trees_root() -> Path:
    return cache_root() / "system"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per suite across processes; readers never lock (the rename publishes)."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_tree(suite_name: str) -> Path:
    """The cached tree for `suite_name`, built first if there is none for the current recipe."""
    suite = SUITES[suite_name]
    spec = recipe(suite)
    root = trees_root()
    final = root / f"{suite.name}-{tree_key(spec)}"
    if final.is_dir():
        _mark_used(final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".lock-{suite.name}"):
        if final.is_dir():
            _mark_used(final)
            return final
        # Left by a build that was killed (we hold the lock, so none is running).
        for stale in root.glob(f".build-{suite.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _prune(root, suite.name)
        work = Path(tempfile.mkdtemp(prefix=f".build-{suite.name}-", dir=root))
        log_path = root / f"{final.name}.log"
        try:
            tree = work / "tree"
            with open(log_path, "w") as log:
                _build(suite, spec, tree, log)
            (root / f"{final.name}.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
            os.rename(tree, final)
            _mark_used(final)
        except BaseException as exc:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:]) if log_path.exists() else ""
            if isinstance(exc, Exception):
                raise TreeBuildError(f"building the {suite.name} tree failed: {exc}\n--- {log_path} ---\n{tail}") from exc
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


# Trees of other recipes (older commits, other checkouts sharing the cache) are removed once
# no run has used them for this long; each is about 500 MB.
PRUNE_AFTER = 7 * 24 * 3600.0


def _mark_used(tree: Path) -> None:
    (tree.parent / f"{tree.name}.used").touch()


def _prune(root: Path, suite: str) -> None:
    for tree in root.glob(f"{suite}-*"):
        used = tree.parent / f"{tree.name}.used"
        if tree.is_dir() and (not used.exists() or time.time() - used.stat().st_mtime > PRUNE_AFTER):
            shutil.rmtree(tree, ignore_errors=True)
            for leftover in (used, tree.parent / f"{tree.name}.json", tree.parent / f"{tree.name}.log"):
                leftover.unlink(missing_ok=True)


def _build(suite: Suite, spec: dict[str, object], tree: Path, log: IO[str]) -> None:
    started = time.monotonic()

    def step(what: str) -> None:
        print(f"=== {time.monotonic() - started:6.1f}s {what}", file=log, flush=True)

    mirror = hostenv.debian_mirror()
    step(f"debootstrap {suite.name} from {mirror}")
    debootstrap = ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus", suite.name, str(tree), mirror]
    if suite.debootstrap_script:
        debootstrap.append(suite.debootstrap_script)
    # debootstrap mounts /proc and /sys in the target itself: in a namespace of its own those
    # mounts cannot outlive it.
    _run(["unshare", "-m", "--propagation", "private", *debootstrap], log, what="debootstrap")

    _write(tree / POLICY_RC_D, "#!/bin/sh\nexit 101\n", mode=0o755)
    _write(tree / UNSAFE_IO, "force-unsafe-io\n")
    if not suite.check_valid_until:
        _write(tree / "etc/apt/apt.conf.d/90vmspawnd-tests", 'Acquire::Check-Valid-Until "false";\n')
    # For the build only; the containers get the host's through a bind mount (nspawn
    # --resolv-conf=off).
    shutil.copy(Path("/etc/resolv.conf").resolve(), tree / "etc/resolv.conf")

    packages = spec["packages"]
    assert isinstance(packages, list)
    step("apt-get install")
    in_tree(tree, ["apt-get", "-q", "update"], log)
    in_tree(tree, ["apt-get", "-q", "-y", "install", "--no-install-recommends", *packages], log)

    step("CA certificates, units, machine-id")
    for cert in hostenv.ca_certificates():
        shutil.copy(cert, tree / "usr/local/share/ca-certificates" / cert.name)
    in_tree(tree, ["update-ca-certificates"], log)
    in_tree(tree, ["systemctl", "mask", *MASKED_UNITS], log)
    in_tree(tree, ["systemctl", "set-default", "multi-user.target"], log)
    # nspawn refuses a tree without one ("Failed to retrieve machine ID"). One per tree is
    # enough: at most one container of a tree runs at a time.
    _write(tree / "etc/machine-id", uuid.uuid4().hex + "\n", mode=0o444)
    # debootstrap copies the host's; the suite's name makes journals and prompts tell them apart.
    _write(tree / "etc/hostname", f"{suite.name}\n")

    step("clean up")
    in_tree(tree, ["apt-get", "clean"], log)
    (tree / POLICY_RC_D).unlink()
    (tree / UNSAFE_IO).unlink()
    tree.chmod(0o755)
    step("done")


def in_tree(tree: Path, argv: Sequence[str], log: IO[str], timeout: float = BUILD_TIMEOUT) -> None:
    """Run `argv` chrooted into `tree` with /proc, /sys and /dev mounted, in a private mount
    namespace (the mounts vanish with it) and a clean environment."""
    script = (
        'set -e; t=$1; shift; mount -t proc proc "$t/proc"; mount --rbind /sys "$t/sys"; '
        'mount --rbind /dev "$t/dev"; exec chroot "$t" "$@"'
    )
    env = [f"{k}={v}" for k, v in CHROOT_ENV.items()]
    _run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(tree), "env", "-i", *env, *argv],
        log,
        timeout,
        what=argv[0],
    )


def _run(argv: Sequence[str], log: IO[str], timeout: float = BUILD_TIMEOUT, what: str = "") -> None:
    print(f"+ {' '.join(argv)}", file=log, flush=True)
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = process.wait(timeout=timeout)
    except BaseException:
        # A timeout or an interrupt: nothing of the build may go on running.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if rc != 0:
        raise TreeBuildError(f"{what or argv[0]} exited with status {rc}")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
