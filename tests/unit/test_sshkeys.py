# SPDX-License-Identifier: LGPL-2.1-or-later
"""The ephemeral SSH key pair: OpenSSH formats ssh-keygen accepts, 0600, gone with the VM."""

from __future__ import annotations

import contextlib
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from vmspawnd.errors import InvalidSpec
from vmspawnd.helpers.sshkeys import (
    AUTHORIZED_KEYS_CREDENTIAL,
    DROPIN_CREDENTIAL,
    SSHD_VSOCK_DROPIN,
    create_ssh_keys,
    generate_keypair,
)

PUBLIC_PREFIX = {"ed25519": b"ssh-ed25519 ", "rsa": b"ssh-rsa ", "ecdsa": b"ecdsa-sha2-nistp256 "}


@pytest.mark.parametrize("key_type", ["ed25519", "rsa", "ecdsa"])
def test_key_pair_is_accepted_by_ssh_keygen(key_type: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        private_path, (authorized, dropin) = create_ssh_keys("vm1", key_type, tmp_path, stack)
        public_path = tmp_path / f"vm1-{key_type}.pub"
        assert private_path == tmp_path / f"vm1-{key_type}"  # vmspawn's <machine>-<type>
        assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
        public = public_path.read_bytes()
        assert public.startswith(PUBLIC_PREFIX[key_type]) and public.endswith(b"\n")
        fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(public_path)], capture_output=True, text=True, check=False)
        assert fingerprint.returncode == 0, fingerprint.stderr
        # The private key is OpenSSH format and belongs to the public one.
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private_path)], capture_output=True, check=False)
        assert derived.returncode == 0, derived.stderr
        assert derived.stdout.split()[:2] == public.split()[:2]
        assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert (authorized.id, authorized.data) == (AUTHORIZED_KEYS_CREDENTIAL, public)
        assert (dropin.id, dropin.data) == (DROPIN_CREDENTIAL, SSHD_VSOCK_DROPIN.encode())
    assert not private_path.exists() and not public_path.exists()


def test_each_key_is_new() -> None:
    first, _ = generate_keypair("ed25519", "c")
    second, _ = generate_keypair("ed25519", "c")
    assert first != second
    key = serialization.load_ssh_private_key(first, password=None)
    assert key is not None


def test_dropin_is_vmspawn_259s() -> None:
    assert SSHD_VSOCK_DROPIN == (
        "[Service]\nExecStart=\n"
        "ExecStart=-sshd -i -o 'AuthorizedKeysFile=%d/ssh.ephemeral-authorized_keys-all .ssh/authorized_keys'\n"
        "ImportCredential=ssh.ephemeral-authorized_keys-all\n"
    )


@pytest.mark.parametrize("key_type", ["dsa", "ed25519-sk", "ecdsa-sk", ""])
def test_other_types_are_refused_clearly(key_type: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec) as info, contextlib.ExitStack() as stack:
        create_ssh_keys("vm1", key_type, tmp_path, stack)
    assert info.value.field == "sshKeyType"
    assert "ssh-keygen" in info.value.reason and "ed25519" in info.value.reason
    assert list(tmp_path.iterdir()) == []
