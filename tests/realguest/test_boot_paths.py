# SPDX-License-Identifier: LGPL-2.1-or-later
"""A real OS, booted by vmspawnd the three ways users boot one, checked from inside.

The guest (image.py) is Debian trixie with systemd as PID 1. Each path is one boot, with the
same options, and one test:

1. ``-D TREE``: a virtiofs root; the kernel and initrd found through the tree's Boot Loader
   Specification entry; the initrd mounts ``root=root rootfstype=virtiofs`` and switches root.
2. ``-i IMAGE --linux --initrd``: a GPT image, the root found by the ``root=PARTUUID=`` that
   vmspawnd reads from the image's root-x86-64 partition.
3. ``-i IMAGE``: the firmware boots the ESP's systemd-boot, which boots the UKI; vmspawnd's
   command line arrives through SMBIOS (``io.systemd.stub.kernel-cmdline-extra``); once with
   the default firmware (Secure Boot capable) and once with ``--secure-boot=no``.

What the guest received comes from its report unit (report.sh) on the console: the
credentials PID 1 imported (``--set-credential``, ``--load-credential``, the SSH key, an
``io.systemd.credential:`` SMBIOS string), the raw SMBIOS type 11 strings, the ``--bind`` and
``--bind-ro`` mounts its systemd made from ``systemd.mount-extra`` (read and written from
inside), the TPM and its PCRs, ``systemd-detect-virt``, the product UUID, and that the system
reached ``running`` with no failed unit. Then the test logs in on the getty through
``vmspawnctl console`` and types a command, and ``vmspawnctl stop`` must power the guest off
through its logind (the console shows ``System Power Off``), not by the deadline's kill.

Each boot takes one to a few minutes under TCG; the times go to the run's summary.
"""

from __future__ import annotations

import base64
import hashlib
import pwd
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmspawnctl.varlink import JsonObject

from tests.integration.test_console import ESCAPE3, Terminal
from tests.realguest.conftest import TIMINGS
from tests.realguest.image import RealGuest
from tests.support import Console, Daemon

pytestmark = pytest.mark.vm

TAG = "VMSPAWND-REAL:"
# Under TCG on 2 shared cores: an image boot reaches `running` in 1-2 min, a virtiofs root in
# 2-4 min; other VMs on the machine slow both.
RUNNING_TIMEOUT = 900.0
RAM = "1G"
SET_VALUE = "set-value, with comma"
SMBIOS_CREDENTIAL = "smbios-value"
PLAIN_SMBIOS = "io.vmspawnd.plain=plain string, with comma"
RW_TARGET = "/mnt/rw"
RO_TARGET = "/mnt/ro"
HOST_FILE = "host-file"
GUEST_FILE = "from-guest"
REPORT_FILE = "vmspawnd-report"  # report.sh's copy on each read-write share
ZERO_PCR = "0" * 64


class Report:
    """The guest's `VMSPAWND-REAL: KEY VALUE` lines (the console log may hold a line twice)."""

    def __init__(self, text: str) -> None:
        self.facts: list[tuple[str, str]] = []
        for line in text.splitlines():
            _, tag, rest = line.partition(TAG)
            if tag:
                key, _, value = rest.strip().partition(" ")
                if (key, value) not in self.facts:
                    self.facts.append((key, value))

    def all(self, key: str) -> list[str]:
        return [v for k, v in self.facts if k == key]

    def one(self, key: str) -> str:
        values = self.all(key)
        assert len(values) == 1, f"{key}: {values}"
        return values[0]

    def decoded(self, key: str) -> str:
        return base64.b64decode(self.one(key)).decode()

    def credentials(self) -> dict[str, bytes]:
        return {name: base64.b64decode(b64) for name, _, b64 in (v.partition(" ") for v in self.all("credential"))}

    def smbios_strings(self) -> list[str]:
        """The strings of every SMBIOS type 11 structure (after its formatted area)."""
        out = []
        for b64 in self.all("smbios11"):
            raw = base64.b64decode(b64)
            out += [s.decode() for s in raw[raw[1] :].split(b"\0") if s]
        return out

    def mounts(self) -> dict[str, tuple[str, list[str]]]:
        """virtiofs target -> (tag, options)."""
        out = {}
        for value in self.all("mount"):
            target, source, options = value.split(" ")
            out[target] = (source, options.split(","))
        return out

    def one_of(self, key: str, first: str) -> str:
        """The rest of the one `key` line whose first word is `first`."""
        values = [rest for word, _, rest in (v.partition(" ") for v in self.all(key)) if word == first]
        assert len(values) == 1, f"{key} {first}: {values} (all {key}: {self.all(key)})"
        return values[0]

    def pcrs(self) -> dict[int, str]:
        return {int(n): v for n, _, v in (value.partition(" ") for value in self.all("pcr"))}

    def efivar(self, name: str) -> bytes | None:
        """An EFI variable's value, without its 4 attribute bytes."""
        for value in self.all("efivar"):
            var, _, b64 = value.partition(" ")
            if var == name:
                return base64.b64decode(b64)[4:]
        return None


class Inputs:
    """What each boot gives the guest, and the host side of its bind mounts."""

    def __init__(self, tmp_path: Path) -> None:
        self.uuid = str(uuid.uuid4())
        self.rw = tmp_path / "share-rw"
        self.ro = tmp_path / "share-ro"
        for share in (self.rw, self.ro):
            share.mkdir()
            (share / HOST_FILE).write_text(f"host file in {share.name}\n")
        self.cred_file = tmp_path / "loaded.cred"
        self.cred_file.write_bytes(b"loaded\x00binary\xff\n")

    def args(self) -> list[str]:
        return [
            f"--uuid={self.uuid}",
            f"--set-credential=vmspawnd.set:{SET_VALUE}",
            f"--load-credential=vmspawnd.load:{self.cred_file}",
            f"--smbios11=io.systemd.credential:vmspawnd.smbios={SMBIOS_CREDENTIAL}",
            f"--smbios11={PLAIN_SMBIOS}",
            f"--bind={self.rw}:{RW_TARGET}",
            f"--bind-ro={self.ro}:{RO_TARGET}",
        ]


class Boot:
    """One boot of the module: its VM name, its label in the times, how to make its arguments."""

    def __init__(self, key: str, label: str, make_args: Callable[[RealGuest, Path], list[str]]) -> None:
        self.key = key
        self.name = f"rg-{key}"
        self.label = label
        self.make_args = make_args
        self.directory = Path()
        self.inputs: Inputs
        self.started = 0.0
        self.company = ""  # what else ran meanwhile, for the times
        self.running_at = 0.0  # when the console showed `running` (the watcher's clock)
        self.watcher: threading.Thread | None = None
        self.watch_error: BaseException | None = None

    def watch(self, daemon: Daemon) -> None:
        """Note when the guest reports `running`, in a thread of its own: a VM started ahead
        gets there before its test looks."""

        def run() -> None:
            try:
                with Console(daemon.call("Describe", {"name": self.name})["machine"]) as console:
                    # Loose: a line cut by other output on the console must not make the wait miss it.
                    console.wait_for(r"REAL: state \S+|report-done", timeout=RUNNING_TIMEOUT)
                self.running_at = time.monotonic()
            except BaseException as exc:  # handed to the test, which re-raises it
                self.watch_error = exc

        self.watcher = threading.Thread(target=run, name=f"watch-{self.name}", daemon=True)
        self.watcher.start()


def directory_args(guest: RealGuest, directory: Path) -> list[str]:
    """-D on a copy of the tree (2-3 s), no --linux: the BLS entry names the kernel and initrd."""
    tree = directory / "realguest"
    subprocess.run(["cp", "-a", "--reflink=auto", str(guest.tree), str(tree)], check=True)
    return ["-D", str(tree)]


def copy_disk(guest: RealGuest, directory: Path) -> Path:
    """A private copy of the cached image (sparse: < 1 s), since the guest writes to its root."""
    disk = directory / "realguest.raw"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(guest.disk), str(disk)], check=True)
    return disk


BOOTS = {
    boot.key: boot
    for boot in (
        Boot("directory", "-D TREE (virtiofs root, BLS entry)", directory_args),
        Boot(
            "linux",
            "-i IMAGE --linux --initrd (root=PARTUUID=)",
            lambda g, d: ["-i", str(copy_disk(g, d)), f"--linux={g.kernel}", f"--initrd={g.initrd}"],
        ),
        Boot("uki-default", "-i IMAGE (firmware, systemd-boot, UKI)", lambda g, d: ["-i", str(copy_disk(g, d))]),
        Boot(
            "uki-no",
            "-i IMAGE --secure-boot=no (firmware, systemd-boot, UKI)",
            lambda g, d: ["-i", str(copy_disk(g, d)), "--secure-boot=no"],
        ),
    )
}


class Fleet:
    """Starts the module's boots one ahead: while a test checks its VM, logs in and powers it
    off, the next test's VM is already booting. Never more than two VMs (this machine's limit,
    and one per host core under TCG). The slowest boot (-D, virtiofs) is the module's last test,
    so the image boots pair up before it."""

    def __init__(self, daemon: Daemon, guest: RealGuest, base: Path, order: list[str]) -> None:
        self.daemon = daemon
        self.guest = guest
        self.base = base
        self.order = order
        self.running: list[str] = []
        self.started: set[str] = set()

    def _start(self, key: str) -> None:
        boot = BOOTS[key]
        boot.directory = self.base / key
        boot.directory.mkdir()
        boot.inputs = Inputs(boot.directory)
        args = boot.make_args(self.guest, boot.directory)
        boot.company = f" (beside {', '.join(BOOTS[k].name for k in self.running)})" if self.running else ""
        boot.started = time.monotonic()
        result = self.daemon.ctl("start", "-M", boot.name, "--kvm=no", f"--ram={RAM}", *boot.inputs.args(), *args)
        assert result.returncode == 0, result.stderr
        self.started.add(key)
        self.running.append(key)
        boot.watch(self.daemon)

    def take(self, key: str) -> Boot:
        """`key`'s boot, started now if it was not yet; then the next one in order starts."""
        if key not in self.started:
            self._start(key)
        later = self.order[self.order.index(key) + 1 :] if key in self.order else []
        following = [k for k in later if k not in self.started]
        if following and len(self.running) < 2:
            self._start(following[0])
        return BOOTS[key]

    def finish(self, key: str) -> None:
        """Terminate (if it still runs) and remove `key`'s VM."""
        name = BOOTS[key].name
        state = self.daemon.call("Describe", {"name": name})["machine"]["state"]
        if state not in ("stopped", "failed"):
            self.daemon.call("Terminate", {"name": name})
        self.daemon.call("Remove", {"name": name})
        self.running.remove(key)


def boot_key(item: pytest.Item) -> str | None:
    """Which of BOOTS a collected test takes (its `boot` parameter), if any."""
    callspec = getattr(item, "callspec", None)
    key = callspec.params.get("boot") if callspec is not None else None
    return key if isinstance(key, str) else None


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest, daemon: Daemon, real_guest: RealGuest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """The selected tests' boots in their run order (so `-k` starts only what runs)."""
    order = [key for item in request.session.items if item.path == request.path and (key := boot_key(item)) is not None]
    f = Fleet(daemon, real_guest, tmp_path_factory.mktemp("realguest"), order)
    yield f
    for key in list(f.running):  # started ahead for a test that then did not run (-x)
        f.finish(key)


def wait_for_report(console: Console, boot: Boot) -> Report:
    """Wait for `running` (timed, for the summary) and then for the whole report, which the
    guest also leaves on the read-write share: the console interleaves the getty's and the
    kernel's output with it, sometimes inside a line, so the facts are read from the share."""
    assert boot.watcher is not None
    boot.watcher.join(RUNNING_TIMEOUT + 60)
    if boot.watch_error is not None:
        raise boot.watch_error
    TIMINGS.append((f"{boot.label}: start to `running`{boot.company}", boot.running_at - boot.started))
    console.wait_for(r"report-done", timeout=RUNNING_TIMEOUT)
    published = boot.inputs.rw / REPORT_FILE
    assert published.is_file(), f"no report on the read-write share; the console:\n{console.text()[-5000:]}"
    return Report(published.read_text())


def check_common(report: Report, inputs: Inputs, machine: JsonObject) -> str:
    """The facts every path must show; returns the guest's kernel command line."""
    assert report.one("state") == "running", f"failed units: {report.all('failed')}"
    assert report.all("failed") == []
    assert report.one("virt") == "qemu"
    assert report.one("product-uuid").lower() == inputs.uuid

    public_key = Path(f"{machine['sshPrivateKeyPath']}.pub").read_bytes()
    assert public_key.startswith(b"ssh-ed25519 ")
    expected = {
        "vmspawnd.set": SET_VALUE.encode(),
        "vmspawnd.load": inputs.cred_file.read_bytes(),
        "vmspawnd.smbios": SMBIOS_CREDENTIAL.encode(),  # an io.systemd.credential: SMBIOS string
        "ssh.ephemeral-authorized_keys-all": public_key,
    }
    creds = report.credentials()
    assert {name: creds.get(name) for name in expected} == expected, f"all credentials: {creds}"
    strings = report.smbios_strings()
    assert PLAIN_SMBIOS in strings
    assert f"io.systemd.credential:vmspawnd.smbios={SMBIOS_CREDENTIAL}" in strings

    cmdline = report.decoded("cmdline")
    words = cmdline.split()
    assert "console=hvc0" in words
    mounts = report.mounts()
    for target, share, mode in ((RW_TARGET, inputs.rw, "rw"), (RO_TARGET, inputs.ro, "ro")):
        tag, options = mounts[target]
        assert options[0] == mode, (target, options)
        assert f'systemd.mount-extra="{tag}:{target}:virtiofs:{mode}"' in words, cmdline
        assert base64.b64decode(report.one_of("read", f"{target}/{HOST_FILE}")) == (share / HOST_FILE).read_bytes()
    assert report.one_of("write", RW_TARGET) == "ok"
    assert (inputs.rw / GUEST_FILE).read_text() == "written by the guest\n"
    assert "Read-only file system" in base64.b64decode(report.one_of("write", RO_TARGET)).decode()
    assert not (inputs.ro / GUEST_FILE).exists()

    assert report.one("tpm0") == "yes"
    assert "(Power Button)" in report.one("power-button")
    return cmdline


def log_in_on_the_getty(daemon: Daemon, name: str) -> None:
    """`vmspawnctl console` on a terminal: log in as root on hvc0's getty, type a command."""
    term = Terminal(daemon, "console", name)
    try:
        term.expect(rb"Connected to " + name.encode())
        term.type(b"\r")  # a fresh prompt, whatever the console showed last
        term.expect(rb"realguest login: ", timeout=RUNNING_TIMEOUT)
        term.type(b"root\r")
        term.expect(rb"root@realguest:~# ", timeout=RUNNING_TIMEOUT)
        term.type(b"echo typed-$((6*7)) $(systemctl is-system-running)\r")
        term.expect(rb"typed-42 running", timeout=RUNNING_TIMEOUT)
        term.type(ESCAPE3)
        assert term.wait() == 0
    finally:
        term.close()


def power_off(daemon: Daemon, name: str, console: Console) -> None:
    """`vmspawnctl stop`: the ACPI power button, handled by the guest's logind, must power the
    guest off in an orderly way before the deadline (60 s) would terminate it."""
    result = daemon.ctl("stop", name)
    assert result.returncode == 0, result.stderr
    assert f"{name}: stopped (powered off on request)" in result.stdout, result.stdout
    # systemd's poweroff.target: an orderly shutdown (QEMU has exited by now, so the console log
    # is complete; the kernel's own last words may not have made it out before the power went).
    console.wait_for(r"Reached target .*System Power Off", timeout=60)
    machine = daemon.call("Describe", {"name": name})["machine"]
    assert machine["state"] == "stopped", machine


def file_id(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_boot_files(pid: int) -> list[str]:
    """QEMU's command line; a confined QEMU's `-kernel`/`-initrd` are the daemon's copies in
    its working directory (docs/security.md), named here by content (`file_id`) so a test
    can still tell which file the daemon chose."""
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    for index in range(1, len(argv)):
        if argv[index - 1] in ("-kernel", "-initrd") and not argv[index].startswith("/"):
            argv[index] = file_id(Path(f"/proc/{pid}/cwd") / argv[index])
    return argv


def boot_path(daemon: Daemon, fleet: Fleet, key: str) -> tuple[Report, str, list[str]]:
    """Take the fleet's boot `key` (started ahead), check the common facts, log in on the
    console, power off; returns the report, the guest's command line and QEMU's command line
    (taken while it ran) for path-specific checks. The VM is terminated and removed whatever
    happens."""
    boot = fleet.take(key)
    try:
        machine = daemon.call("Describe", {"name": boot.name})["machine"]
        qemu_argv = qemu_boot_files(int(machine["qemu"]["pid"]))
        with Console(machine) as console:
            try:
                report = wait_for_report(console, boot)
                cmdline = check_common(report, boot.inputs, machine)
                log_in_on_the_getty(daemon, boot.name)
                power_off(daemon, boot.name, console)
            finally:
                # The whole console, for a failure's post-mortem (pytest keeps the last runs' tmp_path).
                (boot.directory / "console.log").write_text(console.text())
        return report, cmdline, qemu_argv
    finally:
        fleet.finish(key)


def utf16(value: bytes | None) -> str:
    assert value is not None
    return value.decode("utf-16-le").rstrip("\0")


@pytest.mark.parametrize("boot", ["linux"])
def test_image_with_linux_and_initrd_root_by_partuuid(daemon: Daemon, fleet: Fleet, real_guest: RealGuest, boot: str) -> None:
    """-i IMAGE --linux --initrd: vmspawnd reads the image's GPT and says root=PARTUUID=."""
    report, cmdline, _ = boot_path(daemon, fleet, boot)
    assert f"root=PARTUUID={real_guest.root_partuuid}" in cmdline.split()
    fstype, source, options = report.one("root").split()
    assert (fstype, source, options.split(",")[0]) == ("ext4", "/dev/vda2", "rw")
    assert report.efivar("LoaderInfo") is None and report.efivar("StubInfo") is None  # no boot loader ran


@pytest.mark.parametrize("boot", ["uki-default", "uki-no"])
def test_image_through_firmware_systemd_boot_and_uki(daemon: Daemon, fleet: Fleet, real_guest: RealGuest, boot: str) -> None:
    """-i IMAGE alone: OVMF -> systemd-boot -> UKI (systemd-stub), which measures itself into
    PCR 11 and appends vmspawnd's command line from SMBIOS to its own. [uki-default]: the
    default firmware; [uki-no]: --secure-boot=no."""
    report, cmdline, argv = boot_path(daemon, fleet, boot)
    assert "-kernel" not in argv
    smm = argv[argv.index("-machine") + 1]
    # The default picks the first Secure Boot capable descriptor without enrolled keys; =no one without.
    assert ("smm=on" if boot == "uki-default" else "smm=off") in smm.split(","), smm
    # The UKI's own .cmdline first, then what vmspawnd sent through SMBIOS.
    assert cmdline.startswith(f"root=PARTUUID={real_guest.root_partuuid} rw "), cmdline
    extra_cmdline = [s for s in report.smbios_strings() if s.startswith("io.systemd.stub.kernel-cmdline-extra=")]
    assert len(extra_cmdline) == 1 and extra_cmdline[0].partition("=")[2] in cmdline, (extra_cmdline, cmdline)
    assert utf16(report.efivar("LoaderInfo")).startswith(f"systemd-boot {real_guest.systemd_version}")
    assert utf16(report.efivar("StubInfo")).startswith(f"systemd-stub {real_guest.systemd_version}")
    pcrs = report.pcrs()
    assert pcrs[11] != ZERO_PCR, pcrs  # the UKI's sections, measured by systemd-stub
    assert pcrs[12] != ZERO_PCR, pcrs  # the command line from SMBIOS, measured too
    fstype, source, _ = report.one("root").split()
    assert (fstype, source) == ("ext4", "/dev/vda2")
    assert report.efivar("SecureBoot") in (None, b"\0"), "no keys are enrolled: Secure Boot is off either way"


@pytest.mark.parametrize("boot", ["directory"])
def test_directory_over_virtiofs_kernel_from_bls_entry(daemon: Daemon, fleet: Fleet, real_guest: RealGuest, boot: str) -> None:
    """-D: the tree is the root (virtiofs); no --linux: the BLS entry in TREE/boot names both."""
    report, cmdline, argv = boot_path(daemon, fleet, boot)
    tree = BOOTS[boot].directory / "realguest"
    assert f"linux /vmlinuz-{real_guest.kernel_version}" in (tree / "boot/loader/entries/debian.conf").read_text()
    words = cmdline.split()
    assert words[words.index("root=root") :][:3] == ["root=root", "rootfstype=virtiofs", "rw"], cmdline
    assert report.one("root").split()[:2] == ["virtiofs", "root"]  # switched to the tree's systemd
    assert report.one("kernel") == real_guest.kernel_version
    for option, name in (("-kernel", "vmlinuz"), ("-initrd", "initrd.img")):
        chosen = tree / f"boot/{name}-{real_guest.kernel_version}"
        assert argv[argv.index(option) + 1] in (str(chosen), file_id(chosen)), option  # the path, or a confined copy


def test_bind_user(daemon: Daemon, real_guest: RealGuest, tmp_path: Path) -> None:
    """--bind-user: the user resolves in the guest (`userdbctl user NAME`), its home is shared.

    Needs a virtiofsd that translates IDs (vmspawnd refuses it otherwise, and says why) and a
    guest systemd (>= 258) that loads userdb.transient.* credentials.
    """
    users = [u for u in pwd.getpwall() if u.pw_uid >= 1000 and u.pw_uid != 65534 and Path(u.pw_dir).is_dir()]
    if not users:
        pytest.skip("no regular host user with a home directory to bind")
    user = users[0].pw_name
    disk = copy_disk(real_guest, tmp_path)
    inputs = Inputs(tmp_path)
    result = daemon.ctl(
        "start",
        "-M",
        "rg-user",
        "--kvm=no",
        f"--ram={RAM}",
        *inputs.args(),
        "-i",
        str(disk),
        f"--linux={real_guest.kernel}",
        f"--initrd={real_guest.initrd}",
        f"--bind-user={user}",
        f"vmspawnd_real.user={user}",
    )
    if result.returncode != 0:
        assert "cannot translate IDs" in result.stderr, result.stderr
        pytest.skip(f"vmspawnd refuses --bind-user on this host: {result.stderr.strip()}")
    try:
        if real_guest.systemd_version < 258:
            pytest.skip(f"the guest's systemd {real_guest.systemd_version} predates userdb.transient.* credentials (258)")
        machine = daemon.call("Describe", {"name": "rg-user"})["machine"]
        with Console(machine) as console:
            console.wait_for(r"report-done", timeout=RUNNING_TIMEOUT)
        report = Report((inputs.rw / REPORT_FILE).read_text())
        assert report.one_of("userdb", user).startswith("ok "), report.all("userdb")
        assert f"/run/vmhost/home/{user}" in report.mounts()
    finally:
        daemon.call("Terminate", {"name": "rg-user"})
        daemon.call("Remove", {"name": "rg-user"})
