# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pure builder and its host-side helpers (discovery, resolve, vsock).

The argv shapes are pinned by tests/golden; here: payload file contents, refusals,
escaping against an independent QemuOpts splitter, and the pieces with I/O.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import os
import struct
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.golden.scenarios import BASE, IMG, KERNEL, PAYLOAD, SCENARIOS
from vmspawnd.errors import InvalidSpec
from vmspawnd.qemu import resolve, vsock
from vmspawnd.qemu.command import build_qemu_command
from vmspawnd.qemu.resources import Credential
from vmspawnd.qemu.siphash import derive_vsock_cid_candidates
from vmspawnd.spec import CredentialData, VmSpec, check_property, discovery


def split_qemu_opts(text: str) -> list[tuple[str, str]]:
    """Independent QemuOpts splitter: ',' separates, ',,' is a literal comma, first '=' splits."""
    out: list[tuple[str, str]] = []
    key, value, in_value, i = "", "", False, 0
    while i <= len(text):
        ch = text[i] if i < len(text) else None
        if ch == "," and i + 1 < len(text) and text[i + 1] == "," and in_value:
            value += ","
            i += 2
            continue
        if ch is None or ch == ",":
            out.append((key, value))
            key, value, in_value = "", "", False
        elif ch == "=" and not in_value:
            in_value = True
        elif in_value:
            value += ch
        else:
            key += ch
        i += 1
    return out


def args_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_payload_files_hold_smbios_strings() -> None:
    spec, res = SCENARIOS["kitchen-sink"]
    cmd = build_qemu_command(spec, res)
    files = {os.path.basename(k): v for k, v in cmd.files.items()}
    assert files["smbios11-0"] == b"foo=bar"
    assert files["credential.c1"] == b"io.systemd.credential.binary:c1=" + base64.b64encode(b"v1")
    assert files["credential.ssh.ephemeral-authorized_keys-all"].endswith(base64.b64encode(b"ssh-ed25519 K"))
    assert all(path.startswith(PAYLOAD + "/") for path in cmd.files)
    # Direct boot: the cmdline goes to -append, not to SMBIOS.
    assert "io.systemd.stub.kernel-cmdline-extra" not in files
    assert args_after(cmd.argv, "-append") == ["console=hvc0 root=/dev/vda1 systemd.mount-extra=\"mnt0:/srv:virtiofs:rw\""]
    # Secrets never in the argv.
    assert not any(base64.b64encode(b"v1").decode() in a for a in cmd.argv)


def test_firmware_boot_cmdline_in_two_smbios_files() -> None:
    spec, res = SCENARIOS["firmware-cmdline-smbios"]
    files = {os.path.basename(k): v for k, v in build_qemu_command(spec, res).files.items()}
    assert files == {
        "io.systemd.stub.kernel-cmdline-extra": b"io.systemd.stub.kernel-cmdline-extra=console=hvc0 systemd.log_level=debug",
        "io.systemd.boot.kernel-cmdline-extra": b"io.systemd.boot.kernel-cmdline-extra=console=hvc0 systemd.log_level=debug",
    }


def test_binary_credential_round_trips() -> None:
    spec, res = SCENARIOS["credentials-binary"]
    (content,) = build_qemu_command(spec, res).files.values()
    prefix, _, b64 = content.partition(b"=")
    assert prefix == b"io.systemd.credential.binary:bin" and base64.b64decode(b64) == b"a\0b\xff\n"


def test_duplicate_credential_between_user_and_helper_refused() -> None:
    spec = VmSpec(image=IMG, credentials=[CredentialData("x", "eQ==")])
    res = dataclasses.replace(BASE, credentials=(Credential("x", b"z"),))
    with pytest.raises(InvalidSpec, match="Duplicated credential 'x'"):
        build_qemu_command(spec, res)


def test_duplicate_credential_in_spec_refused() -> None:
    with pytest.raises(InvalidSpec, match="Duplicate credential"):
        VmSpec(image=IMG, credentials=[CredentialData("x", "eQ=="), CredentialData("x", "eQ==")]).validate()


def test_notify_address_inline() -> None:
    spec, res = SCENARIOS["notify"]
    assert args_after(build_qemu_command(spec, res).argv, "-smbios")[-1] == (
        "type=11,value=io.systemd.credential:vmm.notify_socket=vsock-stream:2:12345"
    )


def test_tap_mac_derived_from_machine_id_and_name() -> None:
    from vmspawnd.qemu.siphash import derive_mac

    spec, res = SCENARIOS["network-tap"]
    (nic,) = args_after(build_qemu_command(spec, res).argv, "-nic")
    opts = dict(split_qemu_opts(nic))
    assert opts["ifname"] == "vt-fedora" and opts["mac"] == derive_mac(res.host_machine_id or b"", "fedora")
    spec, res = SCENARIOS["network-tap-long-name"]
    (nic,) = args_after(build_qemu_command(spec, res).argv, "-nic")
    ifname = dict(split_qemu_opts(nic))["ifname"]
    assert len(ifname) == 15 and ifname.startswith("vt-a-very-l")


def test_vsock_fd_is_passed() -> None:
    spec, res = SCENARIOS["vsock"]
    cmd = build_qemu_command(spec, res)
    assert 5 in cmd.pass_fds and "vhost-vsock-pci,guest-cid=1234567,vhostfd=5" in cmd.argv


unsafe_text = st.text(alphabet=st.sampled_from(list("ab,=\"' \\:\n") + ["é"]), min_size=1, max_size=20)


@given(name=unsafe_text, tpm=unsafe_text)
def test_values_cannot_inject_options(name: str, tpm: str) -> None:
    path = "/img/" + name.replace("/", "_")
    spec = VmSpec(name="vm", image=path, extra_drives=[path])
    res = dataclasses.replace(BASE, tpm_socket="/run/" + tpm)
    argv = build_qemu_command(spec, res).argv
    drive = dict(split_qemu_opts(args_after(argv, "-drive")[1]))
    assert drive["file"] == path and drive["format"] == "raw" and len(split_qemu_opts(args_after(argv, "-drive")[1])) == 5
    blockdev = split_qemu_opts(args_after(argv, "-blockdev")[0])
    assert dict(blockdev)["file.filename"] == path and len(blockdev) == 6
    chr_tpm = next(a for a in args_after(argv, "-chardev") if a.startswith("socket,id=chrtpm"))
    assert split_qemu_opts(chr_tpm) == [("socket", ""), ("id", "chrtpm"), ("path", "/run/" + tpm)]


def test_memory_rounds_up_to_mib() -> None:
    spec, res = SCENARIOS["ram-rounding"]
    assert args_after(build_qemu_command(spec, res).argv, "-m") == ["301M"]


# --- discovery ---------------------------------------------------------------------------


def make_gpt(parts: list[tuple[uuid.UUID, uuid.UUID, int]], sector: int = 512) -> bytes:
    """A minimal GPT disk image: protective MBR, header at LBA 1, 128 entries at LBA 2."""
    entries = bytearray(128 * 128)
    for i, (type_guid, unique, attrs) in enumerate(parts):
        struct.pack_into("<16s16sQQQ", entries, i * 128, type_guid.bytes_le, unique.bytes_le, 34 + i, 34 + i, attrs)
        entries[i * 128 + 56 : i * 128 + 56 + 8] = "root".encode("utf-16-le")
    header = bytearray(92)
    struct.pack_into("<8sIIIIQQQQ16sQIII", header, 0, b"EFI PART", 0x10000, 92, 0, 0, 1, 63, 34, 62,
                     uuid.uuid4().bytes_le, 2, 128, 128, zlib.crc32(entries))
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    disk = bytearray(64 * sector)
    disk[sector : sector + 92] = header
    disk[2 * sector : 2 * sector + len(entries)] = entries
    return bytes(disk)


def test_gpt_root_partuuid(tmp_path: Path) -> None:
    root_id = uuid.uuid4()
    esp = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
    image = tmp_path / "disk.raw"
    image.write_bytes(make_gpt([(esp, uuid.uuid4(), 0), (discovery.ROOT_TYPES["x86_64"], root_id, 0)]))
    assert discovery.image_root_word(str(image), "x86_64") == f"root=PARTUUID={root_id}"


def test_gpt_usr_only_and_no_auto(tmp_path: Path) -> None:
    usr_id = uuid.uuid4()
    image = tmp_path / "disk.raw"
    image.write_bytes(make_gpt([
        (discovery.ROOT_TYPES["x86_64"], uuid.uuid4(), discovery.GPT_FLAG_NO_AUTO),
        (discovery.USR_TYPES["x86_64"], usr_id, 0),
    ]))
    assert discovery.image_root_word(str(image), "x86_64") == f"mount.usr=PARTUUID={usr_id}"


def test_gpt_missing(tmp_path: Path) -> None:
    image = tmp_path / "plain.raw"
    image.write_bytes(b"\0" * 8192)
    with pytest.raises(LookupError, match="no GUID partition table"):
        discovery.image_root_word(str(image), "x86_64")
    image.write_bytes(make_gpt([(uuid.uuid4(), uuid.uuid4(), 0)]))
    with pytest.raises(LookupError, match="root= or mount.usr="):
        discovery.image_root_word(str(image), "x86_64")


def test_gpt_parsed_like_sfdisk(tmp_path: Path) -> None:
    import shutil
    import subprocess

    sfdisk = shutil.which("sfdisk") or ("/sbin/sfdisk" if os.path.exists("/sbin/sfdisk") else None)
    if sfdisk is None:
        pytest.skip("sfdisk not installed")
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    layout = f"label: gpt\nsize=2MiB, type={discovery.ROOT_TYPES['x86_64']}, name=root\n"
    subprocess.run([sfdisk, "-q", str(image)], input=layout.encode(), check=True, capture_output=True)
    out = subprocess.run([sfdisk, "--part-uuid", str(image), "1"], check=True, capture_output=True, text=True).stdout
    assert discovery.image_root_word(str(image), "x86_64") == f"root=PARTUUID={out.strip().lower()}"


def test_bls_default_entry_then_uki_then_conf(tmp_path: Path) -> None:
    (tmp_path / "boot" / "loader" / "entries").mkdir(parents=True)
    (tmp_path / "boot" / "loader" / "entries" / "b-6.1.conf").write_text("linux /vmlinuz-6.1\ninitrd /i1 /i2\ninitrd /i3\n")
    entry = discovery.find_boot_entry(str(tmp_path))
    assert entry.kernel == f"{tmp_path}/boot/vmlinuz-6.1" and entry.initrds == tuple(f"{tmp_path}/boot/{i}" for i in ("i1", "i2", "i3"))
    (tmp_path / "efi" / "EFI" / "Linux").mkdir(parents=True)
    for v in ("6.2", "6.10"):
        (tmp_path / "efi" / "EFI" / "Linux" / f"linux-{v}.efi").write_bytes(b"")
    assert discovery.find_boot_entry(str(tmp_path)).kernel.endswith("linux-6.10.efi")
    (tmp_path / "efi" / "loader").mkdir()
    (tmp_path / "efi" / "loader" / "loader.conf").write_text("timeout 3\ndefault b-*.conf\n")
    assert discovery.find_boot_entry(str(tmp_path)).id == "b-6.1.conf"


# --- resolve, vsock ------------------------------------------------------------------------


def test_grow_image_rounds_and_never_shrinks(tmp_path: Path) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(b"x" * 100)
    assert resolve.grow_image(str(image), 5000) == 8192 and image.stat().st_size == 8192
    assert resolve.grow_image(str(image), 10) == 8192 and image.stat().st_size == 8192
    with pytest.raises(InvalidSpec):
        resolve.grow_image("/dev/null", 4096)


def test_load_firmware_by_path_and_secure_boot_mismatch(tmp_path: Path) -> None:
    desc = "/usr/share/qemu/firmware/60-edk2-x86_64.json"
    if not os.path.exists(desc):
        pytest.skip("no OVMF descriptors")
    fw = resolve.load_firmware("x86_64", desc, None, tmp_path / "vars")
    assert fw.secure_boot is False and fw.vars_path is None and os.path.exists(fw.code_path)
    with pytest.raises(InvalidSpec, match="Secure Boot requested"):
        resolve.load_firmware("x86_64", desc, True, tmp_path / "vars")
    sb = resolve.load_firmware("x86_64", None, True, tmp_path / "vars2")
    assert sb.secure_boot and sb.vars_path and os.stat(sb.vars_path).st_mode & 0o777 == 0o600


def test_vmgenid_is_a_v4_uuid_stable_per_id() -> None:
    a = resolve.derive_vmgenid("0123456789abcdef0123456789abcdef")
    assert a == resolve.derive_vmgenid("0123456789abcdef0123456789abcdef")
    assert uuid.UUID(a).version == 4 and a != resolve.derive_vmgenid("0123456789abcdef0123456789abcdee")


def test_vsock_absent_device(tmp_path: Path) -> None:
    missing = str(tmp_path / "vhost-vsock")
    assert vsock.open_vhost_vsock(None, missing) is None
    assert vsock.open_vhost_vsock(False, missing) is None
    with pytest.raises(OSError) as info:
        vsock.open_vhost_vsock(True, missing)
    assert info.value.errno == errno.ENOENT


def test_vsock_candidates() -> None:
    assert vsock.cid_candidates("vm", 77) == [77]
    c = vsock.cid_candidates("vm", None)
    assert c[:64] == derive_vsock_cid_candidates("vm") and len(c) == 128 and all(3 <= x <= 0xFFFFFFFE for x in c)
    assert vsock.VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60


def test_vsock_collision_moves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []

    def fake(fd: int, cid: int) -> None:
        tried.append(cid)
        if len(tried) < 3:
            raise OSError(errno.EADDRINUSE, "in use")

    monkeypatch.setattr(vsock, "_set_cid", fake)
    assert vsock.assign_cid(-1, "vm", None) == derive_vsock_cid_candidates("vm")[2]
    monkeypatch.setattr(vsock, "_set_cid", lambda fd, cid: (_ for _ in ()).throw(OSError(errno.EADDRINUSE, "x")))
    with pytest.raises(OSError):
        vsock.assign_cid(-1, "vm", 99)  # explicit CID: one try, failure fatal


@pytest.mark.parametrize("prop", ["MemoryMax=1G", "MemoryHigh=80%", "CPUQuota=150%", "TasksMax=infinity", "CPUWeight=idle",
                                  "IOWeight=100", "DeviceAllow=/dev/kvm rw", "DevicePolicy=closed", "AllowedCPUs=0-1,3"])
def test_property_subset_accepts(prop: str) -> None:
    check_property(prop)


@pytest.mark.parametrize("prop", ["KillMode=none", "ExecStart=/bin/sh", "MemoryMax=lots", "CPUWeight=0", "noequals"])
def test_property_subset_rejects_by_name(prop: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        check_property(prop)
    assert prop.partition("=")[0] in info.value.reason or "NAME=VALUE" in info.value.reason


def test_machine_name_of_directory() -> None:
    assert VmSpec(directory="/srv/trees/my_tree", linux=KERNEL).machine_name() == "mytree"
