# SPDX-License-Identifier: LGPL-2.1-or-later
"""Build, once, the tiny kernel + initramfs guest that VM tests boot.

The guest is Debian's stock kernel plus a busybox initramfs whose /init
(init.sh next to this file) prints raw facts about the virtual hardware.
Building needs network access once (``apt-get download``), so the result
is cached outside the repository, keyed by a hash of everything that
shapes the image; editing init.sh or this file therefore rebuilds.

Run ``python -m tests.guest.build`` from the repository root to build and
print the paths as ``KERNEL=...`` / ``INITRD=...`` lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
INIT_SCRIPT = HERE / "init.sh"
BUSYBOX = pathlib.Path("/bin/busybox")
KERNEL_METAPACKAGE = "linux-image-amd64"

# Where init.sh finds the load order; keep in sync with MODULE_LIST there.
MODULE_LIST_PATH = "etc/vmspawnd-test/modules.load"

# What the tests need from the guest; module names use "_" (the kernel
# treats "-" and "_" alike).  Names that are built into the kernel or do not
# exist are skipped, dependencies come from modules.dep.
WANTED_MODULES = (
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_ring",
    "virtio",
    "virtio_console",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "tpm",
    "tpm_tis_core",
    "tpm_tis",
    "tpm_crb",
    "fuse",
    "virtiofs",
    "button",
    "evdev",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "efivarfs",
    "bochs",
    "virtio_gpu",
)

_COMPRESSED_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz")
_MODULE_SUFFIXES = (".ko",) + _COMPRESSED_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Guest:
    """A bootable guest: pass ``kernel``/``initrd`` to -kernel/-initrd."""

    kernel: pathlib.Path
    initrd: pathlib.Path
    kernel_version: str


class GuestBuildError(RuntimeError):
    """The guest could not be built (no network, no apt, bad package...)."""


# --------------------------------------------------------------------------
# cache handling


def cache_root() -> pathlib.Path:
    """The cache directory; refuses the repository so builds never dirty it."""
    configured = os.environ.get("VMSPAWND_TEST_CACHE")
    root = pathlib.Path(configured) if configured else pathlib.Path.home() / ".cache" / "vmspawnd-tests"
    root = root.resolve()
    if root == REPO_ROOT or REPO_ROOT in root.parents:
        raise GuestBuildError(f"VMSPAWND_TEST_CACHE must be outside the repository: {root}")
    return root


def cache_key() -> str:
    """Hash of every input we control, so an edit to any of them rebuilds."""
    digest = hashlib.sha256()
    for path in (pathlib.Path(__file__).resolve(), INIT_SCRIPT, BUSYBOX):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _load_cached(directory: pathlib.Path) -> Guest | None:
    """Return the guest in ``directory`` if a finished build is there."""
    version_file = directory / "kernel-version"
    if not version_file.is_file():
        return None
    return Guest(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_version=version_file.read_text().strip(),
    )


@contextlib.contextmanager
def _locked(root: pathlib.Path) -> Iterator[None]:
    """Serialise builds across processes (pytest-xdist, parallel runs)."""
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_guest() -> Guest:
    """Return the cached guest, building it first if needed.

    Readers never take the lock: a build happens in a temporary directory
    that is renamed into place only when complete, so a visible cache entry
    is always whole.  The lock only stops two racers from both building.
    """
    root = cache_root()
    final = root / f"guest-{cache_key()}"
    guest = _load_cached(final)
    if guest is not None:
        return guest
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        guest = _load_cached(final)
        if guest is None:
            _build_and_publish(root, final)
            guest = _load_cached(final)
    if guest is None:
        raise GuestBuildError(f"build finished but {final} is incomplete")
    return guest


def _build_and_publish(root: pathlib.Path, final: pathlib.Path) -> None:
    """Build into a temp dir under ``root`` and atomically rename it."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide it from other users
    try:
        _build(root, staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Someone published without our lock (e.g. a different cache
            # version of this code); theirs is as good as ours.
            if _load_cached(final) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------
# kernel package


def _run(argv: list[str], cwd: pathlib.Path | None = None) -> str:
    """Run a host tool; failures carry its stderr so they are diagnosable."""
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _apt_update() -> None:
    """Refresh apt lists; only done when a lookup or download failed."""
    _run(["apt-get", "update"])


def _kernel_package() -> str:
    """The versioned package behind the linux-image-amd64 metapackage.

    Downloading the metapackage itself yields no kernel, so follow its
    dependency to e.g. linux-image-6.1.0-56-amd64.
    """
    pattern = re.compile(r"^\s*Depends:\s*(linux-image-\S+)", re.MULTILINE)
    for attempt in range(2):
        try:
            match = pattern.search(_run(["apt-cache", "depends", KERNEL_METAPACKAGE]))
        except GuestBuildError:
            match = None
        if match:
            return match.group(1)
        if attempt == 0:
            _apt_update()
    raise GuestBuildError(f"cannot resolve the kernel package behind {KERNEL_METAPACKAGE}")


# Since Debian 14 (forky) linux-image-VERSION holds no files: the kernel is in
# linux-binary-VERSION (usr/lib/modules/VERSION/vmlinuz) and its modules in
# linux-modules-VERSION.
_SPLIT_PARTS = re.compile(r"^\s*Depends:\s*(linux-(?:binary|modules)-\S+)", re.MULTILINE)


def _kernel_parts(package: str) -> list[str]:
    """``package`` and the packages holding its kernel and modules, where it is split."""
    return [package, *_SPLIT_PARTS.findall(_run(["apt-cache", "depends", package]))]


def _download(package: str, downloads: pathlib.Path) -> pathlib.Path:
    """Fetch ``package``'s .deb into ``downloads`` (kept across rebuilds)."""
    downloads.mkdir(parents=True, exist_ok=True)
    cached = sorted(downloads.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        try:
            _run(["apt-get", "download", package], cwd=pathlib.Path(tmp))
        except GuestBuildError:
            _apt_update()
            _run(["apt-get", "download", package], cwd=pathlib.Path(tmp))
        debs = list(pathlib.Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise GuestBuildError(f"apt-get download {package} produced {debs}")
        target = downloads / debs[0].name
        os.rename(debs[0], target)
    return target


def _extract(debs: list[pathlib.Path], into: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, str]:
    """Unpack the kernel's .debs; return (vmlinuz, module dir, version)."""
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(into)])
    names = ", ".join(deb.name for deb in debs)
    # From trixie on (merged /usr), the package ships its modules in usr/lib/modules only.
    # lib -> usr/lib, as on such a system, so that this and busybox depmod (which looks in
    # ROOT/lib/modules) find them either way.
    if not (into / "lib").exists() and (into / "usr" / "lib" / "modules").is_dir():
        (into / "lib").symlink_to("usr/lib")
    module_dirs = [p for p in (into / "lib" / "modules").iterdir() if p.is_dir()]
    if len(module_dirs) != 1:
        raise GuestBuildError(f"expected one kernel in {names}, found {module_dirs}")
    version = module_dirs[0].name
    for vmlinuz in (into / "boot" / f"vmlinuz-{version}", module_dirs[0] / "vmlinuz"):
        if vmlinuz.is_file():
            return vmlinuz, module_dirs[0], version
    raise GuestBuildError(f"{names} has no boot/vmlinuz-{version} or lib/modules/{version}/vmlinuz")


# --------------------------------------------------------------------------
# modules


def module_name(path: str) -> str:
    """Kernel module name of a .ko path ("virtio-gpu.ko.xz" -> "virtio_gpu")."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _read_module(path: pathlib.Path) -> bytes:
    """Module bytes, decompressed: busybox insmod may not handle compression."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def _decompress_tree(moddir: pathlib.Path) -> None:
    """Replace compressed modules by plain .ko so busybox depmod reads them."""
    for path in list(moddir.rglob("*.ko.*")):
        if path.name.endswith(_COMPRESSED_SUFFIXES):
            plain = path.with_name(path.name[: path.name.index(".ko") + 3])
            plain.write_bytes(_read_module(path))
            path.unlink()


def _ensure_modules_dep(root: pathlib.Path, moddir: pathlib.Path, version: str) -> pathlib.Path:
    """modules.dep of the kernel, generating it if the package lacks one.

    Debian ships no modules.dep (depmod runs in postinst), so run busybox's
    depmod, which needs no host kmod, against the unpacked tree.
    """
    dep = moddir / "modules.dep"
    if not dep.is_file():
        _decompress_tree(moddir)
        _run([str(BUSYBOX), "depmod", "-b", str(root), version])
    if not dep.is_file():
        raise GuestBuildError(f"no modules.dep for {version}")
    return dep


def parse_modules_dep(text: str, moddir: str = "") -> dict[str, list[str]]:
    """Map module path -> dependency paths (relative to the module dir)."""
    prefix = moddir.rstrip("/") + "/" if moddir else ""

    def relative(path: str) -> str:
        return path[len(prefix) :] if prefix and path.startswith(prefix) else path

    graph: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        module, deps = line.split(":", 1)
        graph[relative(module.strip())] = [relative(d) for d in deps.split()]
    return graph


def load_order(graph: dict[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """Paths of ``wanted`` modules and their dependencies, dependencies first.

    modules.dep lists each module's full dependency set but not necessarily
    in load order, so do a depth-first topological sort.
    """
    by_name = {module_name(path): path for path in graph}
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(path: str) -> None:
        if state.get(path) == "done":
            return
        if state.get(path) == "visiting":
            raise GuestBuildError(f"dependency cycle through {path}")
        state[path] = "visiting"
        for dep in graph.get(path, []):
            visit(dep)
        state[path] = "done"
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return order


def _builtin_names(moddir: pathlib.Path) -> set[str]:
    """Names of modules compiled into the kernel (nothing to load)."""
    builtin = moddir / "modules.builtin"
    if not builtin.is_file():
        return set()
    return {module_name(line.strip()) for line in builtin.read_text().splitlines() if line.strip()}


def _warn_missing(graph: dict[str, list[str]], builtin: set[str]) -> None:
    """Tell the builder about wanted modules this kernel does not have."""
    known = {module_name(path) for path in graph} | builtin
    for name in WANTED_MODULES:
        if name not in known:
            print(f"tests/guest: kernel has no module {name}, skipping", file=sys.stderr)


# --------------------------------------------------------------------------
# initramfs


class NewcArchive:
    """Minimal writer for the "newc" cpio format the kernel unpacks.

    Written by hand rather than with cpio(1) so that entries are owned by
    root, device nodes can be created without privileges, and timestamps
    are fixed (reproducible output).
    """

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self._stream = stream
        self._inode = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        self._stream.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._stream.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)


def _busybox_applets() -> list[str]:
    """All applets of the host's busybox-static, for the interactive shell."""
    return sorted(set(_run([str(BUSYBOX), "--list"]).split()) - {"busybox"})


def _parent_dirs(paths: Iterable[str]) -> list[str]:
    """Every directory needed to hold ``paths``, parents before children."""
    dirs: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs, key=lambda d: (d.count("/"), d))


_SKELETON_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "run", "mnt", "var")
# Common paths resolve in the shell even though everything lives in /bin.
_SKELETON_LINKS = (("sbin", "bin"), ("usr", "."), ("var/run", "../run"))


def _add_skeleton(archive: NewcArchive, extra_paths: Iterable[str]) -> None:
    """Directories, compatibility links, and the device nodes the kernel
    needs before devtmpfs is mounted (it opens /dev/console for /init)."""
    for directory in sorted(set(_SKELETON_DIRS) | set(_parent_dirs(extra_paths)), key=lambda d: (d.count("/"), d)):
        archive.directory(directory)
    for link, target in _SKELETON_LINKS:
        archive.symlink(link, target)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3)


def _add_busybox(archive: NewcArchive) -> None:
    """busybox plus a link per applet, so the test shell has every command."""
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in _busybox_applets():
        archive.symlink(f"bin/{applet}", "busybox")


def _add_modules(archive: NewcArchive, module_files: dict[str, pathlib.Path]) -> None:
    """Decompressed modules plus the load-order list /init walks."""
    for dest, source in module_files.items():
        archive.file(dest, _read_module(source))
    load_list = "".join(f"{module_name(dest)} /{dest}\n" for dest in module_files)
    archive.file(MODULE_LIST_PATH, load_list.encode())


def _write_initramfs(target: pathlib.Path, moddir: pathlib.Path, version: str, modules: list[str]) -> None:
    """Write the gzip-compressed newc initramfs the guest boots from.

    ``modules`` is in load order; dict order keeps it in the list.
    """
    module_files = {f"lib/modules/{version}/{module_name(p)}.ko": moddir / p for p in modules}
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
        archive = NewcArchive(gz)
        _add_skeleton(archive, [*module_files, MODULE_LIST_PATH])
        _add_busybox(archive)
        _add_modules(archive, module_files)
        archive.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        archive.finish()


# --------------------------------------------------------------------------
# build


def _build(root: pathlib.Path, staging: pathlib.Path) -> None:
    """Produce vmlinuz, initrd.img and kernel-version in ``staging``."""
    debs = [_download(part, root / "downloads") for part in _kernel_parts(_kernel_package())]
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=root) as unpack:
        unpacked = pathlib.Path(unpack)
        vmlinuz, moddir, version = _extract(debs, unpacked)
        dep = _ensure_modules_dep(unpacked, moddir, version)
        graph = parse_modules_dep(dep.read_text(), str(moddir))
        builtin = _builtin_names(moddir)
        _warn_missing(graph, builtin)
        modules = load_order(graph, [n for n in WANTED_MODULES if n not in builtin])
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
        _write_initramfs(staging / "initrd.img", moddir, version, modules)
    # Written last: its presence marks the build as complete.
    (staging / "kernel-version").write_text(version + "\n")


def main() -> int:
    """CLI: build if needed and print the paths for shell use."""
    try:
        guest = ensure_guest()
    except GuestBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"KERNEL={guest.kernel}")
    print(f"INITRD={guest.initrd}")
    print(f"KERNEL_VERSION={guest.kernel_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
