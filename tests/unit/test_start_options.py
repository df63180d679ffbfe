# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnctl start: every systemd-vmspawn 259 option, good forms → spec, bad forms → exit 2.

A bad form must be refused before any daemon is contacted: the address points nowhere, so
reaching it would exit 1 ("is vmspawnd running?"), not 2.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import threading
from pathlib import Path

import pytest
from vmspawnctl.main import main
from vmspawnctl.start_spec import parse_start, spec_from_args

from vmspawnd.spec import BindMount, VmSpec


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("SYSTEMD_VMSPAWN_QEMU_EXTRA", "SYSTEMD_VMSPAWN_NETWORK_MAC", "CREDENTIALS_DIRECTORY", "TERM"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "disk.raw").write_bytes(b"\0" * 4096)
    (tmp_path / "share").mkdir()
    return tmp_path


def spec(*argv: str, env: dict[str, str] | None = None) -> VmSpec:
    return spec_from_args(parse_start(argv), env=env or {})


def refuse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(["--address", "/nonexistent/socket", "start", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    return err


BASE = ["-M", "vm", "--linux=k"]

BAD_FORMS = [
    ("--ram", ["--ram=1X", "--ram=-1", "--ram=1g", "--ram="]),
    ("--qemu-mem", ["--qemu-mem=lots"]),
    ("--kvm", ["--kvm=maybe", "--kvm=AUTO"]),
    ("--vsock", ["--vsock=2"]),
    ("--qemu-vsock", ["--qemu-vsock=sometimes"]),
    ("--vsock-cid", ["--vsock-cid=2", "--vsock-cid=host", "--vsock-cid=4294967295", "--vsock-cid=x1"]),
    ("--tpm", ["--tpm=perhaps"]),
    ("--tpm-state", ["--tpm-state=relative/path", "--tpm-state=maybe"]),
    ("--firmware", ["--firmware=relative.json", "--firmware="]),
    ("--discard-disk", ["--discard-disk=auto", "--discard-disk=2"]),
    ("--secure-boot", ["--secure-boot=sometimes"]),
    ("--grow-image", ["--grow-image=big", "-Gbig"]),
    ("--notify-ready", ["--notify-ready=auto"]),
    ("--machine", ["-M-bad", "--machine=a..b", "--machine=" + "x" * 65, "--machine=under_score"]),
    ("--uuid", ["--uuid=xyz", "--uuid=00000000-0000-0000-0000-000000000000", "--uuid=123"]),
    ("--slice", ["--slice=foo.service", "-S/"]),
    (
        "--property",
        [
            "--property=Nice=5",
            "--property=MemoryMax",
            "--property=CPUQuota=fast",
            "--property=TasksMax=-1",
            "--property=DevicePolicy=open",
        ],
    ),
    ("--register", ["--register=auto-ish", "--register=maybe"]),
    ("--private-users", ["--private-users=abc", "--private-users=100:0", "--private-users=4294967295", "--private-users=-1"]),
    ("--bind", ["--bind=", "--bind=share:relative", "--bind=missing:/m", "--bind=share"]),
    ("--bind-ro", ["--bind-ro=:/x", "--bind-ro=k:/x"]),
    ("--extra-drive", ["--extra-drive="]),
    ("--bind-user", ["--bind-user=1abc", "--bind-user=a/b"]),
    ("--bind-user-shell", ["--bind-user-shell=bash"]),
    ("--bind-user-group", ["--bind-user-group=-x"]),
    ("--forward-journal", ["--forward-journal="]),
    ("--pass-ssh-key", ["--pass-ssh-key=auto"]),
    ("--ssh-key-type", ["--ssh-key-type=dsa"]),
    ("--console", ["--console=tty", "--console=headless"]),
    ("--background", ["--background=red", "--background=41;"]),
    (
        "--load-credential",
        ["--load-credential=id", "--load-credential=a/b:./x", "--load-credential=id:./missing", "--load-credential=id:cred"],
    ),
    ("--set-credential", ["--set-credential=novalue", "--set-credential=a/b:v", "--set-credential=x:\\q"]),
    ("--directory", ["--directory="]),
    ("--image", ["--image="]),
    ("--linux", ["--linux="]),
    ("--initrd", ["--initrd="]),
    ("--smbios11", ["--smbios11=\udcff", "-s\udcfe"]),
    ("--cpus", ["--cpus=", "--cpus=1 2", "--qemu-smp=\t", "--cpus=0", "--cpus=2,cores=0", "--cpus=2,foo=1", "--cpus=1.5"]),
]


@pytest.mark.parametrize(("option", "form"), [(o, f) for o, forms in BAD_FORMS for f in forms])
def test_bad_forms_are_refused(work: Path, capsys: pytest.CaptureFixture[str], option: str, form: str) -> None:
    err = refuse([*BASE, form], capsys)
    short = {"--machine": "-M", "--grow-image": "-G", "--slice": "-S"}.get(option)
    assert option in err or (short and short in err), err
    assert "expected" in err or "invalid choice" in err or "supported" in err or "one of" in err, err


def test_every_option_has_bad_forms() -> None:
    value_options = {a.option_strings[-1] for a in _actions() if a.option_strings and a.nargs != 0}
    covered = {o for o, _ in BAD_FORMS}
    missing = {o for o in value_options if not (set(_names(o)) & covered)} - {"--help"}
    assert not missing, missing


def _actions() -> list[argparse.Action]:
    from vmspawnctl.start_options import add_start_options

    parser = argparse.ArgumentParser()
    add_start_options(parser)
    return parser._actions


def _names(last: str) -> list[str]:
    for a in _actions():
        if a.option_strings and a.option_strings[-1] == last:
            return list(a.option_strings)
    return [last]


def test_initrd_requires_linux(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refuse(["-i", "disk.raw", "--initrd=k", "root=/dev/vda"], capsys)
    assert "--initrd" in err


def test_duplicate_credential_ids_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "c").write_bytes(b"x")
    err = refuse([*BASE, "--set-credential=a:1", "--load-credential=a:./c"], capsys)
    assert "Duplicate credential 'a'" in err


def test_bad_env_refused(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_VMSPAWN_NETWORK_MAC", "zz:zz")
    assert "SYSTEMD_VMSPAWN_NETWORK_MAC" in refuse(BASE, capsys)
    monkeypatch.setenv("SYSTEMD_VMSPAWN_NETWORK_MAC", "02:00:00:00:00:01")
    monkeypatch.setenv("SYSTEMD_VMSPAWN_QEMU_EXTRA", "'unterminated")
    assert "SYSTEMD_VMSPAWN_QEMU_EXTRA" in refuse(BASE, capsys)


def test_all_good_forms(work: Path) -> None:
    (work / "cred").write_bytes(b"\0\x01file")
    s = spec(
        "-q",
        "--no-pager",
        "--no-ask-password",
        "-i",
        "disk.raw",
        "--cpus=2,sockets=2",
        "--ram=1.5G",
        "--kvm=no",
        "--vsock=auto",
        "--vsock-cid=0x10",
        "--tpm=yes",
        "--tpm-state=./state",
        "--linux=k",
        "--initrd=k",
        "--initrd=k",
        "-n",
        "--firmware=./fw.json",
        "--discard-disk=no",
        "--secure-boot=yes",
        "-G",
        "1M",
        "-s",
        "a=b",
        "--smbios11=c",
        "--notify-ready=no",
        "-M",
        "vm1",
        "--uuid=0123456789abcdef0123456789ABCDEF",
        "-S",
        "vms",
        "--property=MemoryMax=1G",
        "--property=CPUQuota=50%",
        "--register=no",
        "--keep-unit",
        "--private-users=100000",
        "--bind=share:/mnt/rw",
        "--bind-ro=share:/mnt/ro",
        "--extra-drive=disk.raw",
        "--bind-user=root",
        "--bind-user=root",
        "--bind-user-shell=no",
        "--bind-user-group=wheel",
        "--forward-journal=j.journal",
        "--pass-ssh-key=no",
        "--ssh-key-type=rsa",
        "--console=read-only",
        "--background=48;2;1;2;3",
        "--set-credential=s:a\\x00b",
        "--load-credential=f:./cred",
        "root=/dev/vda1",
        "--not-an-option",
    )
    w = str(work)
    assert s.image == f"{w}/disk.raw" and s.linux == f"{w}/k" and s.initrds == [f"{w}/k", f"{w}/k"]
    assert (s.cpus, s.ram, s.kvm, s.vsock, s.vsock_cid, s.tpm) == ("2,sockets=2", 3 * 1024**3 // 2, False, None, 16, True)
    assert s.tpm_state == f"{w}/state" and s.firmware == f"{w}/fw.json"
    assert (s.network_tap, s.network_user_mode, s.discard_disk, s.secure_boot) == (True, False, False, True)
    assert (s.grow_image, s.smbios11, s.notify_ready, s.name) == (1024**2, ["a=b", "c"], False, "vm1")
    assert s.uuid == "01234567-89ab-cdef-0123-456789abcdef"
    assert (s.slice, s.properties, s.register, s.keep_unit) == ("vms.slice", ["MemoryMax=1G", "CPUQuota=50%"], False, True)
    assert s.private_users == "100000:65536"
    assert s.binds == [BindMount(f"{w}/share", "/mnt/rw"), BindMount(f"{w}/share", "/mnt/ro", True)]
    assert s.extra_drives == [f"{w}/disk.raw"] and s.bind_users == ["root"] and s.bind_user_groups == ["wheel"]
    assert (s.bind_user_shell, s.forward_journal, s.pass_ssh_key, s.ssh_key_type, s.console) == (
        "no",
        f"{w}/j.journal",
        False,
        "rsa",
        "read-only",
    )
    assert [(c.id, base64.b64decode(c.data)) for c in s.credentials] == [("s", b"a\0b"), ("f", b"\0\x01file")]
    assert s.kernel_cmdline == ["root=/dev/vda1", "--not-an-option"]


def test_bind_without_target_needs_absolute_source(work: Path) -> None:
    s = spec(*BASE, f"--bind={work}/share", f"--bind-ro={work}/share:/m\\:x")
    assert s.binds == [BindMount(f"{work}/share", f"{work}/share"), BindMount(f"{work}/share", "/m\\:x", True)]


def test_last_network_option_wins(work: Path) -> None:
    s = spec(*BASE, "-n", "--network-user-mode")
    assert (s.network_tap, s.network_user_mode) == (False, True)
    s = spec(*BASE, "--network-user-mode", "--network-tap")
    assert (s.network_tap, s.network_user_mode) == (True, False)


def test_empty_smbios11_clears_and_empty_machine_clears(work: Path) -> None:
    s = spec("-s", "a", "-s", "", "-s", "b", "-i", "disk.raw", "-M", "x", "-M", "")
    assert s.smbios11 == ["b"] and s.name == "disk"


def test_aliases(work: Path) -> None:
    s = spec(*BASE, "--qemu-smp=3", "--qemu-mem=1G", "--qemu-kvm=yes", "--qemu-vsock=no", "--qemu-gui")
    assert (s.cpus, s.ram, s.kvm, s.vsock, s.console) == ("3", 1024**3, True, False, "gui")


def test_tpm_state_forms(work: Path) -> None:
    assert spec(*BASE, "--tpm-state=").tpm_state == "off"
    assert spec(*BASE, "--tpm-state=yes").tpm_state == "auto"
    assert spec(*BASE, "--tpm-state=off").tpm_state == "off"
    assert spec(*BASE, "--tpm-state=/abs").tpm_state == "/abs"


def test_context_from_environment(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = work / "creds"
    creds.mkdir()
    (creds / "mine").write_bytes(b"from-credentials-dir")
    env = {
        "SYSTEMD_VMSPAWN_QEMU_EXTRA": "-device 'virtio-tablet-pci' -no-reboot",
        "SYSTEMD_VMSPAWN_NETWORK_MAC": "02-AA-bb-cc-dd-ee",
        "TERM": "xterm-256color",
    }
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))  # read while parsing, like vmspawn
    s = spec(*BASE, "--load-credential=x:mine", env=env)
    assert s.qemu_extra == ["-device", "virtio-tablet-pci", "-no-reboot"]
    assert s.network_mac == "02:aa:bb:cc:dd:ee" and s.term == "xterm-256color"
    assert base64.b64decode(s.credentials[0].data) == b"from-credentials-dir"


def test_load_credential_from_socket(work: Path) -> None:
    path = work / "cred.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(b"socket-data\0")
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        s = spec(*BASE, "--load-credential=s:./cred.sock")
    finally:
        thread.join()
        server.close()
    assert base64.b64decode(s.credentials[0].data) == b"socket-data\0"


def test_firmware_list_prints_and_exits_without_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    from vmspawnd.spec.firmware import find_descriptor_paths

    with pytest.raises(SystemExit) as info:
        main(["--address", "/nonexistent/socket", "start", "--firmware=list"])
    assert info.value.code == 0
    assert capsys.readouterr().out.splitlines() == find_descriptor_paths(os.environ.get("XDG_CONFIG_HOME"))


def test_help_documents_every_option_grouped(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["start", "--help"])
    out = capsys.readouterr().out
    for group in (
        "Image options",
        "Host configuration",
        "System identity options",
        "Property options",
        "User namespacing options",
        "Mount options",
        "Integration options",
        "Input/output options",
        "Credentials",
    ):
        assert group in out
    for action in _actions():
        for opt in action.option_strings:
            assert opt in out


def test_default_directory_is_cwd_with_bls(work: Path) -> None:
    entries = work / "efi" / "loader" / "entries"
    entries.mkdir(parents=True)
    (work / "efi" / "vmlinuz-6").write_bytes(b"k")
    (entries / "a.conf").write_text("title x\nlinux /vmlinuz-6\ninitrd /initrd-6\n")
    s = spec()
    assert s.directory == str(work) and s.linux == f"{work}/efi/vmlinuz-6" and s.initrds == [f"{work}/efi/initrd-6"]
    assert s.name == work.name.replace("_", "")


def test_directory_without_kernel_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refuse(["-D", "share"], capsys)
    assert "--linux" in err


def test_machine_image_lookup(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = work / "home" / ".local" / "state" / "machines"
    images.mkdir(parents=True)
    (images / "deb.raw").write_bytes(b"")
    (images / "tree").mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    env = {"HOME": str(work / "home")}
    assert spec("-M", "deb", env=env).image == str(images / "deb.raw")
    tree = spec("-M", "tree", "--linux=k", env=env)
    assert tree.directory is None  # --linux given: a disk-less direct boot (docs/deviations.md)
    (images / "tree" / "efi" / "EFI" / "Linux").mkdir(parents=True)
    (images / "tree" / "efi" / "EFI" / "Linux" / "uki.efi").write_bytes(b"")
    s = spec("-M", "tree", env=env)
    assert s.directory == str(images / "tree") and s.linux == str(images / "tree/efi/EFI/Linux/uki.efi")
