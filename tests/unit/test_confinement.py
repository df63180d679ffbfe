# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pieces of a confined VM (docs/security.md): its id, the setpriv prefix, what the
daemon opens for QEMU, and how the argv builder refers to it."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
from pathlib import Path

import pytest

from vmspawnd import state_seal
from vmspawnd.daemon import confinement_range, parse_args
from vmspawnd.host.confinement import unprivileged_prefix
from vmspawnd.host.identity import IdRange, VmIdentity, hand_over_tree, ids_in_use, known_to_nss, parse_range, pick_identity
from vmspawnd.outcome import describe_exit
from vmspawnd.qemu.command import SANDBOX, build_qemu_command
from vmspawnd.qemu.handover import FileInUse, copy_for_vm, open_files, open_for_qemu
from vmspawnd.qemu.resources import Firmware, Resources
from vmspawnd.spec import VmSpec

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners and identities needs root")


def test_parse_range_takes_inclusive_bounds_and_refuses_the_16_bit_ids() -> None:
    assert parse_range("0x70000000-0x7000ffff") == IdRange(0x70000000, 0x10000)
    assert parse_range("100000-100009") == IdRange(100000, 10)
    for bad in ("70000", "5-1000000", "200000-100000", "0-10"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_pick_identity_takes_the_lowest_id_no_vm_holds_and_no_database_names() -> None:
    ids = IdRange(500000, 5)
    assert pick_identity(ids, set(), lambda _: False) == VmIdentity(500000, 500000)
    assert pick_identity(ids, {500000, 500001}, lambda value: value == 500002) == VmIdentity(500003, 500003)
    with pytest.raises(LookupError, match="500000…500004"):
        pick_identity(ids, {500000, 500001, 500002}, lambda value: value > 500002)


def test_pick_identity_skips_what_the_user_database_knows() -> None:
    # root (0) is in every user database; the first id nobody names is handed out.
    free = next(v for v in range(0x70000000, 0x70001000) if not known_to_nss(v))
    assert known_to_nss(0)
    assert pick_identity(IdRange(free, 1), set()).uid == free
    with pytest.raises(LookupError):
        pick_identity(IdRange(0, 1), set())


@as_root
def test_ids_in_use_are_the_owners_of_the_vm_directories_in_the_range(tmp_path: Path) -> None:
    ids = IdRange(0x70000000, 16)
    for name, owner in (("a", 0x70000003), ("b", 0x70000000), ("c", 0), ("d", 0x70000010)):
        (tmp_path / name).mkdir()
        os.chown(tmp_path / name, owner, owner)
    assert ids_in_use(tmp_path, ids) == {0x70000000, 0x70000003}


@as_root
def test_hand_over_tree_changes_every_owner_and_follows_no_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    (state / "sub" / "file").write_text("x")
    outside = tmp_path / "outside"
    outside.write_text("y")
    (state / "link").symlink_to(outside)
    hand_over_tree(state, VmIdentity(0x70000001, 0x70000001))
    owners = {p.name: (os.lstat(p).st_uid, os.lstat(p).st_gid) for p in [state, *state.rglob("*")]}
    assert set(owners.values()) == {(0x70000001, 0x70000001)}
    assert os.stat(outside).st_uid == 0


@as_root
def test_the_prefix_leaves_no_privilege_and_keeps_the_pid() -> None:
    identity = VmIdentity(0x70000002, 0x70000002)
    argv = [*unprivileged_prefix(identity), "sh", "-c", 'echo "$$"; cat /proc/self/status']
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    pid, *lines = out.splitlines()
    assert int(pid) == proc.pid  # setpriv execs: the reaper reports QEMU's own pid
    status = {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert status["Uid"].split() == [str(identity.uid)] * 4 and status["Gid"].split() == [str(identity.gid)] * 4
    assert status["Groups"] == ""
    assert [int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")] == [0] * 5
    assert status["NoNewPrivs"] == "1"


def test_the_prefix_keeps_only_the_groups_asked_for() -> None:
    prefix = unprivileged_prefix(VmIdentity(7, 8), groups=[36])
    assert "--groups=36" in prefix and "--clear-groups" not in prefix
    assert prefix[-1] == "--"


def test_open_files_opens_read_only_what_qemu_only_reads(tmp_path: Path) -> None:
    code, nvram, image, drive = (tmp_path / n for n in ("code.fd", "vars.fd", "image.raw", "drive.raw"))
    for path in (code, nvram, image, drive):
        path.write_bytes(b"\0" * 512)
    firmware = Firmware(str(code), "raw", True, str(nvram))
    fds = open_files(VmSpec(image=str(image), extra_drives=[str(drive)]), firmware)
    try:
        assert {path: [_accmode(fd) for fd in fd_tuple] for path, fd_tuple in fds.items()} == {
            str(code): [os.O_RDONLY],
            str(nvram): [os.O_RDWR, os.O_RDONLY],
            str(image): [os.O_RDWR, os.O_RDONLY],
            str(drive): [os.O_RDWR, os.O_RDONLY],
        }
    finally:
        for fd_tuple in fds.values():
            for fd in fd_tuple:
                os.close(fd)


def test_a_file_qemu_writes_is_locked_for_as_long_as_qemu_holds_it(tmp_path: Path) -> None:
    """The daemon's OFD write lock (QEMU's own locking is off on fdsets): a second VM's
    open of the same image is refused as in use; a frozen base (read-only) is not locked;
    the lock goes with the last fd, as when QEMU exits."""
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * 512)
    first = open_for_qemu(str(image), True)
    try:
        with pytest.raises(FileInUse) as refused:
            open_for_qemu(str(image), True)
        assert refused.value.filename == str(image) and "in use" in str(refused.value)
        # Another QEMU writing the image meets the lock (its own locks are OFD locks too).
        probe = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)], capture_output=True, text=True)
        assert probe.returncode != 0 and "lock" in probe.stderr, probe.stderr
        shared = open_for_qemu(str(image), False)
        os.close(shared[0])
    finally:
        for fd in first:
            os.close(fd)
    again = open_for_qemu(str(image), True)
    for fd in again:
        os.close(fd)


def test_a_spec_path_that_cannot_be_opened_is_a_start_failure_naming_it(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * 512)
    held = open_for_qemu(str(image), True)
    try:
        with pytest.raises(OSError) as refused:
            open_files(VmSpec(image=str(image)), None)
        assert refused.value.filename == str(image)
        assert open_files(VmSpec(image=str(image)), None, image_writable=False)[str(image)]  # a frozen base
    finally:
        for fd in held:
            os.close(fd)


def _accmode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def test_open_files_closes_what_it_opened_when_one_file_is_missing(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        open_files(VmSpec(image=str(image), extra_drives=[str(tmp_path / "missing")]), None)
    assert set(os.listdir("/proc/self/fd")) == before


@as_root
def test_copy_for_vm_is_a_private_copy_the_vm_owns(tmp_path: Path) -> None:
    source = tmp_path / "vmlinuz"
    source.write_bytes(b"kernel" * 1000)
    copy = Path(copy_for_vm(str(source), tmp_path / "kernel", VmIdentity(0x70000004, 0x70000004)))
    st = os.stat(copy)
    assert copy.read_bytes() == source.read_bytes()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0x70000004, 0x70000004, 0o400)


def test_a_confined_qemu_gets_fdsets_for_its_files_and_the_sandbox() -> None:
    spec = VmSpec(image="/img/a,b.raw", extra_drives=["/img/d.raw"])
    res = Resources(
        qemu_binary="qemu",
        kvm=False,
        qmp_fd=3,
        console_fd=4,
        console_log="/run/console.log",
        firmware=Firmware("/fw/code.fd", "raw", False, None),
        initrd=None,
        payload_dir="/run/payload",
        confined=True,
        file_fds={"/fw/code.fd": (10,), "/img/a,b.raw": (11, 12), "/img/d.raw": (13, 14)},
    )
    command = build_qemu_command(spec, res)
    argv = command.argv
    add_fds = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-add-fd"]
    assert add_fds == [
        "fd=10,set=0,opaque=/fw/code.fd",
        "fd=11,set=1,opaque=/img/a,,b.raw",
        "fd=12,set=1,opaque=/img/a,,b.raw",
        "fd=13,set=2,opaque=/img/d.raw",
        "fd=14,set=2,opaque=/img/d.raw",
    ]
    assert {10, 11, 12, 13, 14} <= set(command.pass_fds)
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert not [a for a in argv if "/img/" in a and not a.startswith(("fd=", "virtio-blk"))]  # paths only as opaque labels
    # The serial the guest sees is still the file's name, not the fdset's.
    assert "virtio-blk-pci,drive=vmspawn,bootindex=1,serial=a,,b.raw" in argv


def test_an_unconfined_qemu_is_vmspawns() -> None:
    res = Resources("qemu", False, 3, 4, "/run/console.log", None, None, payload_dir="/run/payload")
    argv = build_qemu_command(VmSpec(image="/img/a.raw"), res).argv
    assert "-sandbox" not in argv and "-add-fd" not in argv
    assert "if=none,id=vmspawn,file=/img/a.raw,format=raw,discard=on" in argv


def test_a_seccomp_kill_is_named() -> None:
    assert describe_exit(-31) == "QEMU was killed by SIGSYS: QEMU's seccomp sandbox (-sandbox) refused a system call"
    assert describe_exit(-9) == "QEMU was killed by SIGKILL"


def test_the_daemon_confines_only_as_root_and_unless_told_to_run_qemu_as_root() -> None:
    default = confinement_range(parse_args([]))
    assert default == (IdRange() if os.geteuid() == 0 else None)
    assert confinement_range(parse_args(["--qemu-user=root"])) is None
    ranged = confinement_range(parse_args(["--vm-id-range=0x71000000-0x710000ff"]))
    assert ranged == (IdRange(0x71000000, 256) if os.geteuid() == 0 else None)
    with pytest.raises(SystemExit):
        parse_args(["--vm-id-range=10-20"])  # inside the 16-bit ids: refused at the command line


@as_root
def test_a_confined_vms_state_is_trusted_only_as_the_daemon_wrote_it(tmp_path: Path) -> None:
    directory = tmp_path / "machines" / "0a1b2c3d"
    directory.mkdir(parents=True)
    state = directory / "state.json"
    # The daemon's own directory: nothing else writes there, nothing to check.
    state.write_bytes(b"{}")
    assert not state_seal.needs_seal(directory) and state_seal.trusted_state(directory)

    os.chown(directory, 0x70000005, 0x70000005)  # now the VM's
    for version in (b'{"v": 1}', b'{"v": 2}', b'{"v": 3}'):
        state_seal.seal(directory, version)
        state.write_bytes(version)
        assert state_seal.trusted_state(directory)
    assert stat.S_IMODE(os.stat(tmp_path / "seals").st_mode) == 0o700
    # A crash between the seal and the write: the previous state is still known.
    state_seal.seal(directory, b'{"v": 4}')
    assert state_seal.trusted_state(directory)
    state.write_bytes(b'{"v": 1}')  # older than the last two writes
    assert not state_seal.trusted_state(directory)
    # What the VM can do in its own directory: rename a root-owned file it filled over it.
    (directory / "qemu.log").write_bytes(b'{"machine": {"qemu": {"pid": 1}}}')
    os.replace(directory / "qemu.log", state)
    assert not state_seal.trusted_state(directory)
    state.unlink()
    state.symlink_to(tmp_path / "seals" / "0a1b2c3d")
    assert not state_seal.trusted_state(directory)  # never read through a link
    state_seal.remove_seal(directory)
    assert not (tmp_path / "seals" / "0a1b2c3d").exists()
