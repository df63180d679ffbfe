# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pure builder (discovery, resolve and vsock have their own test modules).

The argv shapes are pinned by tests/golden; here: payload file contents, refusals,
escaping against an independent QemuOpts splitter, the --property subset and the
machine name of a directory.
"""

from __future__ import annotations

import base64
import dataclasses
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.golden.scenarios import BASE, IMG, KERNEL, PAYLOAD, SCENARIOS
from vmspawnd.errors import InvalidSpec
from vmspawnd.qemu.command import build_qemu_command
from vmspawnd.qemu.resources import Credential
from vmspawnd.spec import CredentialData, VmSpec, check_property


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
    assert args_after(cmd.argv, "-append") == ['console=hvc0 root=/dev/vda1 systemd.mount-extra="mnt0:/srv:virtiofs:rw"']
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


def _card(argv: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The network card's netdev and device options (qemu/nic.py)."""
    (netdev,) = args_after(argv, "-netdev")
    (device,) = [d for d in args_after(argv, "-device") if d.startswith("virtio-net-pci,")]
    return dict(split_qemu_opts(netdev)), dict(split_qemu_opts(device))


def test_tap_mac_derived_from_machine_id_and_name() -> None:
    from vmspawnd.qemu.siphash import derive_mac

    spec, res = SCENARIOS["network-tap"]
    netdev, device = _card(build_qemu_command(spec, res).argv)
    assert netdev["ifname"] == "vt-fedora" and device["mac"] == derive_mac(res.host_machine_id or b"", "fedora")
    spec, res = SCENARIOS["network-tap-long-name"]
    netdev, _ = _card(build_qemu_command(spec, res).argv)
    assert len(netdev["ifname"]) == 15 and netdev["ifname"].startswith("vt-a-very-l")


@pytest.mark.parametrize("scenario", ["network-tap", "network-tap-mac", "network-user"])
def test_the_card_sits_on_its_own_root_port_and_reaches_its_netdev(scenario: str) -> None:
    """Unpluggable for snapshots: on a pcie-root-port, not the root bus (-nic)."""
    spec, res = SCENARIOS[scenario]
    argv = build_qemu_command(spec, res).argv
    netdev, device = _card(argv)
    (port,) = [dict(split_qemu_opts(d)) for d in args_after(argv, "-device") if d.startswith("pcie-root-port,")]
    assert device["bus"] == port["id"] and device["netdev"] == netdev["id"] and "-nic" not in argv


def test_a_vm_without_network_has_no_card_and_no_port() -> None:
    spec, res = SCENARIOS["image-minimal"]
    argv = build_qemu_command(spec, res).argv
    assert args_after(argv, "-nic") == ["none"] and not [d for d in args_after(argv, "-device") if "pcie-root-port" in d]


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


@pytest.mark.parametrize(
    "prop",
    [
        "MemoryMax=1G",
        "MemoryHigh=80%",
        "CPUQuota=150%",
        "TasksMax=infinity",
        "CPUWeight=idle",
        "IOWeight=100",
        "DeviceAllow=/dev/kvm rw",
        "DevicePolicy=closed",
        "AllowedCPUs=0-1,3",
    ],
)
def test_property_subset_accepts(prop: str) -> None:
    check_property(prop)


@pytest.mark.parametrize("prop", ["KillMode=none", "ExecStart=/bin/sh", "MemoryMax=lots", "CPUWeight=0", "noequals"])
def test_property_subset_rejects_by_name(prop: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        check_property(prop)
    assert prop.partition("=")[0] in info.value.reason or "NAME=VALUE" in info.value.reason


def test_machine_name_of_directory() -> None:
    assert VmSpec(directory="/srv/trees/my_tree", linux=KERNEL).machine_name() == "mytree"
