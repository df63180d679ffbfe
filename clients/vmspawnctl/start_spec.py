# SPDX-License-Identifier: LGPL-2.1-or-later
"""The parsed `start`/`run` command line → a validated VmSpec, on the client side.

start_options.py defines the options (spelling, parsers, accepted forms); this module turns
what they parsed into the spec. It first refuses command lines vmspawn's own parsing would
turn into something else (`check_arguments`), then reads what vmspawn reads from its own
context with the caller's rights: credential files, $CREDENTIALS_DIRECTORY, the environment,
machine images and boot entries (`-M NAME`, `-D` with no kernel), the image's GPT for
`root=PARTUUID=`. So the daemon never opens a path on a client's behalf.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vmspawnd.errors import InvalidSpec, to_camel
from vmspawnd.spec import CredentialData, VmSpec, discovery, parsers

from .start_options import add_start_options
from .usage import UsageError


def looks_like_machine_name(word: str) -> bool:
    """A bare word that can only be a name: a valid hostname without '=', '/' or '.'
    (kernel arguments are KEY=VALUE, paths, dotted flags like rd.break, or runlevels)."""
    return parsers.is_valid_hostname(word) and not any(c in word for c in "=/.") and not word.isdigit()


def check_arguments(args: argparse.Namespace) -> None:
    """Mistakes vmspawn's own parsing would turn into something else, caught before any
    discovery runs (whose errors would then point away from them)."""
    if getattr(args, "initrds", None) and not args.linux:
        # vmspawn's verify_arguments(); checked before the -D . default, whose boot-entry
        # search would otherwise fail first with a message about a missing UKI.
        raise UsageError("--initrd needs --linux")
    words = list(getattr(args, "kernel_cmdline", None) or [])
    given = args.name is not None or args.image or args.directory or args.linux
    if words and not given and looks_like_machine_name(words[0]):
        # getopt with '+' (vmspawn's parser) ends the options at the first positional word:
        # `start dwpos --linux=K` would boot -D . with "dwpos --linux=K" as kernel arguments.
        rest = " ".join(words[1:])
        raise UsageError(
            f"{words[0]!r} looks like a machine name: use -M {words[0]}. The first argument that is not an "
            "option starts the kernel command line"
            + (f" (here also: {rest})" if rest else "")
            + "; to pass it to the kernel, give -D, -i or --linux before it"
        )


def spec_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> VmSpec:
    """Build and validate the spec, reading the client's context (env, discovery).

    UsageError for a command line that cannot mean what it says (check_arguments);
    notices about defaults the caller may not expect go to stderr unless -q."""
    env = dict(os.environ) if env is None else env
    check_arguments(args)
    fields = _fields_from_args(args, env)

    def notice(text: str) -> None:
        if not getattr(args, "quiet", False):
            print(f"vmspawnctl: {text}", file=sys.stderr, flush=True)

    _discover(fields, user=os.geteuid() != 0, env=env, notice=notice)
    spec = VmSpec(**fields)
    spec.validate()
    return spec


def clone_request_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, object]:
    """`start --from-snapshot`: the spec fields given on the command line, and only those
    (the daemon takes the rest from the bundle and refuses what a clone cannot change, an
    option given with its default value included). No discovery: the clone's disk is the
    bundle's, and -M names the clone, not an image to look up."""
    if not args.name:
        raise UsageError("--from-snapshot= needs the clone's name (-M NAME)")
    fields = _fields_from_args(args, dict(os.environ) if env is None else env)
    spec = VmSpec(**fields)
    request = spec.to_json()
    for key in fields:
        request.setdefault(to_camel(key), getattr(spec, key))
    return request


def _fields_from_args(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """VmSpec's keyword arguments for the options given, each from its option's parser."""
    fields: dict[str, Any] = {}  # VmSpec's keyword arguments, each from its option's parser
    for key in (
        "image",
        "directory",
        "linux",
        "cpus",
        "ram",
        "kvm",
        "vsock",
        "vsock_cid",
        "tpm",
        "tpm_state",
        "secure_boot",
        "discard_disk",
        "grow_image",
        "notify_ready",
        "uuid",
        "slice",
        "register",
        "private_users",
        "bind_user_shell",
        "forward_journal",
        "pass_ssh_key",
        "ssh_key_type",
        "console",
    ):
        value = getattr(args, key, None)
        if value is not None:
            fields[key] = value
    if args.firmware is not None:
        fields["firmware"] = args.firmware
    if args.name:
        fields["name"] = args.name
    for key in ("initrds", "extra_drives", "kernel_cmdline", "smbios11", "properties", "binds", "bind_users", "bind_user_groups"):
        value = getattr(args, key, None)
        if value:
            fields[key] = list(dict.fromkeys(value)) if key == "bind_users" else list(value)
    if args.keep_unit:
        fields["keep_unit"] = True
    if args.network == "tap":
        fields["network_tap"] = True
    elif args.network == "user":
        fields["network_user_mode"] = True

    seen: set[str] = set()
    creds = []
    for cred_id, data in getattr(args, "credentials", None) or []:
        if cred_id in seen:
            raise InvalidSpec("credentials", f"Duplicate credential '{cred_id}', refusing")
        seen.add(cred_id)
        creds.append(CredentialData(id=cred_id, data=base64.b64encode(data).decode("ascii")))
    if creds:
        fields["credentials"] = creds

    if extra := env.get("SYSTEMD_VMSPAWN_QEMU_EXTRA"):
        try:
            fields["qemu_extra"] = parsers.split_qemu_extra(extra)
        except ValueError as exc:
            raise InvalidSpec("qemuExtra", f"$SYSTEMD_VMSPAWN_QEMU_EXTRA: {exc}") from None
    if mac := env.get("SYSTEMD_VMSPAWN_NETWORK_MAC"):
        try:
            fields["network_mac"] = parsers.parse_ether_addr(mac)
        except ValueError as exc:
            raise InvalidSpec("networkMac", f"$SYSTEMD_VMSPAWN_NETWORK_MAC: {exc}") from None
    if term := env.get("TERM"):
        fields["term"] = term
    return fields


def _discover(fields: dict[str, Any], user: bool, env: dict[str, str], notice: Callable[[str], None]) -> None:
    """vmspawn's own look-ups (docs/reference/systemd-vmspawn.md §1.1, §3.4), with the caller's
    rights. What is chosen without being asked for is told through `notice`, before a
    look-up that may fail on it."""
    if not fields.get("image") and not fields.get("directory"):
        if fields.get("name") and not fields.get("linux"):
            try:
                kind, path = discovery.find_machine_image(str(fields["name"]), discovery.machine_image_dirs(user, env))
            except LookupError as exc:
                raise InvalidSpec("name", str(exc)) from None
            fields[kind] = path
        elif not fields.get("linux"):
            fields["directory"] = os.getcwd()
            notice(f"no -i/-D given: booting the current directory as -D . ({fields['directory']})")
    directory = fields.get("directory")
    if directory and not fields.get("linux"):
        try:
            entry = discovery.find_boot_entry(str(directory))
        except LookupError as exc:
            raise InvalidSpec("directory", str(exc)) from None
        fields["linux"] = entry.kernel
        if entry.initrds:
            fields["initrds"] = list(entry.initrds) + list(fields.get("initrds") or [])
    image = fields.get("image")
    words = list(fields.get("kernel_cmdline") or [])
    if image and fields.get("linux") and not discovery.cmdline_has_root(words):
        from vmspawnd.spec.discovery import native_arch

        try:
            word = discovery.image_root_word(str(image), native_arch())
        except (LookupError, OSError) as exc:
            raise InvalidSpec("image", str(exc)) from None
        fields["kernel_cmdline"] = words + [word]
    if not fields.get("name"):
        try:
            fields["name"] = parsers.default_machine_name(
                str(image) if image else None, str(directory) if directory else None, socket.gethostname()
            )
        except ValueError as exc:
            raise InvalidSpec("name", str(exc)) from None


def parse_start(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `start` options alone (tests and tools)."""
    parser = argparse.ArgumentParser(prog="vmspawnctl start")
    add_start_options(parser)
    return parser.parse_args(list(argv))
