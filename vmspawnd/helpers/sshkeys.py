# SPDX-License-Identifier: LGPL-2.1-or-later
"""The VM's ephemeral SSH key pair (`--pass-ssh-key`, `--ssh-key-type`; docs/reference/systemd-vmspawn.md §6).

vmspawn runs `ssh-keygen -f <runtime>/<machine>-<type> -N "" -t <type>`; the daemon
generates the pair in-process with `cryptography` (no fork per VM, no dependency on
ssh-keygen's defaults), in the same OpenSSH formats and at the same name, so
`ssh -i <key>` and `ssh-keygen -l -f <key>.pub` work exactly as with vmspawn. Only the
types cryptography can write in OpenSSH format are offered: ed25519, rsa (3072 bits, as
ssh-keygen's default) and ecdsa (P-256, ssh-keygen's default); others vmspawn would pass to
ssh-keygen (dsa, the -sk types) are refused with a clear error (docs/deviations.md).

Passed to the guest as vmspawn does, whether or not vsock is on: the public key as
`ssh.ephemeral-authorized_keys-all`, plus a drop-in for `sshd-vsock@.service` that makes sshd
read it. Both key files are deleted when the VM ends.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from vmspawnd.errors import InvalidSpec
from vmspawnd.qemu.resources import Credential
from vmspawnd.runtime_dir import write_private_file

KEY_TYPES = ("ed25519", "rsa", "ecdsa")
AUTHORIZED_KEYS_CREDENTIAL = "ssh.ephemeral-authorized_keys-all"
DROPIN_CREDENTIAL = "systemd.unit-dropin.sshd-vsock@.service"
# systemd-vmspawn 259's drop-in, byte for byte (its C format string has %% for %).
SSHD_VSOCK_DROPIN = (
    "[Service]\n"
    "ExecStart=\n"
    "ExecStart=-sshd -i -o 'AuthorizedKeysFile=%d/ssh.ephemeral-authorized_keys-all .ssh/authorized_keys'\n"
    "ImportCredential=ssh.ephemeral-authorized_keys-all\n"
)

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def check_key_type(key_type: str) -> None:
    if key_type not in KEY_TYPES:
        raise InvalidSpec(
            "sshKeyType",
            f"{key_type!r} is not supported: vmspawnd generates {', '.join(KEY_TYPES)} keys itself "
            "(systemd-vmspawn would pass other types to ssh-keygen)",
        )


def generate_private_key(key_type: str) -> PrivateKey:
    check_key_type(key_type)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP256R1())


def generate_keypair(key_type: str, comment: str) -> tuple[bytes, bytes]:
    """(private key in OpenSSH format, public key line `TYPE BASE64 COMMENT\\n`)."""
    key = generate_private_key(key_type)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b" " + comment.encode() + b"\n"


def key_paths(directory: Path, machine_name: str, key_type: str) -> tuple[Path, Path]:
    """vmspawn 258+: `<runtime>/<machine>-<type>` and the same with `.pub`."""
    private = directory / f"{machine_name}-{key_type}"
    return private, private.with_name(private.name + ".pub")


def credentials_for(public_key: bytes) -> tuple[Credential, Credential]:
    return (
        Credential(AUTHORIZED_KEYS_CREDENTIAL, public_key),
        Credential(DROPIN_CREDENTIAL, SSHD_VSOCK_DROPIN.encode()),
    )


def create_ssh_keys(
    machine_name: str, key_type: str, directory: Path, stack: contextlib.ExitStack | contextlib.AsyncExitStack
) -> tuple[Path, tuple[Credential, Credential]]:
    """Write the pair (private 0600) and register its deletion; returns path and credentials."""
    private, public = generate_keypair(key_type, f"vmspawnd@{machine_name}")
    private_path, public_path = key_paths(directory, machine_name, key_type)
    for path in (private_path, public_path):
        stack.callback(_unlink_quietly, path)
    write_private_file(private_path, private)
    write_private_file(public_path, public)
    return private_path, credentials_for(public)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
