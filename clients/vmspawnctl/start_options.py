# SPDX-License-Identifier: LGPL-2.1-or-later
"""systemd-vmspawn's command line → VmSpec, on the client side.

Same spelling and parsing rules as systemd-vmspawn 259 (getopt with '+': the first
non-option argument and everything after it is kernel command line). Everything is
validated here, before the daemon is contacted; relative paths are resolved against
the caller's cwd, because the daemon has no business with the client's cwd.
"""

from __future__ import annotations

import argparse
import os

from vmspawnd.errors import InvalidSpec
from vmspawnd.parsers import parse_boolean, parse_size, parse_tristate, parse_uuid
from vmspawnd.spec import ConsoleMode, VmSpec, check_machine_name

BOOLEAN_FORMS = "a boolean (yes/no, true/false, on/off, 1/0)"
TRISTATE_FORMS = "a boolean (yes/no, true/false, on/off, 1/0) or 'auto'"


def _typed(parse, forms: str):  # type: ignore[no-untyped-def]
    """Wrap a parser so argparse reports '--option: invalid value: accepted forms'."""

    def convert(text: str):  # type: ignore[no-untyped-def]
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}; expected {forms}") from None

    return convert


def _absolute(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return os.path.normpath(os.path.join(os.getcwd(), text))


def _machine_name(text: str) -> str:
    try:
        check_machine_name(text)
    except InvalidSpec as exc:
        raise argparse.ArgumentTypeError(f"invalid machine name {text!r}: {exc.reason}") from None
    return text


def add_start_options(parser: argparse.ArgumentParser) -> None:
    """The systemd-vmspawn options, grouped like its man page."""
    parser.add_argument("-q", "--quiet", action="store_true", help="suppress status messages")
    img = parser.add_argument_group("Image options")
    img.add_argument("-i", "--image", type=_absolute, metavar="PATH", help="root disk image (raw)")
    host = parser.add_argument_group("Host configuration")
    host.add_argument("--cpus", "--qemu-smp", dest="cpus", metavar="CPUS", help="-smp value passed to QEMU (default 1)")
    host.add_argument(
        "--ram", "--qemu-mem", dest="ram", metavar="BYTES",
        type=_typed(parse_size, "a size in bytes with an optional K, M, G, T, P or E suffix (base 1024), e.g. 2G or 1.5G"),
        help="guest memory (default 2G)",
    )
    host.add_argument("--kvm", "--qemu-kvm", dest="kvm", metavar="BOOL", type=_typed(parse_tristate, TRISTATE_FORMS), help="use KVM (default auto)")
    host.add_argument("--linux", type=_absolute, metavar="PATH", help="kernel for direct kernel boot")
    host.add_argument("--initrd", dest="initrds", action="append", type=_absolute, metavar="PATH", help="initrd (repeatable; merged)")
    host.add_argument("--network-user-mode", action="store_true", help="user-mode (slirp) networking")
    host.add_argument("--discard-disk", metavar="BOOL", type=_typed(parse_boolean, BOOLEAN_FORMS), help="pass discard requests to the image (default yes)")
    sys_ = parser.add_argument_group("System identity")
    sys_.add_argument("-M", "--machine", dest="name", type=_machine_name, metavar="NAME", help="machine name")
    sys_.add_argument("--uuid", type=_typed(parse_uuid, "a 128-bit ID (32 hex digits or UUID form), not all zero"), help="SMBIOS system UUID")
    mounts = parser.add_argument_group("Mount options")
    mounts.add_argument("--extra-drive", dest="extra_drives", action="append", type=_absolute, metavar="PATH", help="additional disk (repeatable)")
    con = parser.add_argument_group("Input/output options")
    con.add_argument(
        "--console", metavar="MODE", choices=[m.value for m in ConsoleMode],
        help="interactive, read-only, native, gui or headless (default interactive)",
    )
    con.add_argument("--qemu-gui", dest="console", action="store_const", const=ConsoleMode.GUI.value, help="same as --console=gui")
    parser.add_argument("kernel_cmdline", nargs=argparse.REMAINDER, metavar="ARGS", help="kernel command line words")


def spec_from_args(args: argparse.Namespace) -> VmSpec:
    fields: dict[str, object] = {}
    for key in ("name", "image", "linux", "cpus", "ram", "kvm", "uuid", "discard_disk", "console"):
        value = getattr(args, key, None)
        if value is not None:
            fields[key] = value
    for key in ("initrds", "extra_drives", "kernel_cmdline"):
        value = getattr(args, key, None)
        if value:
            fields[key] = list(value)
    if args.network_user_mode:
        fields["network_user_mode"] = True
    spec = VmSpec(**fields)  # type: ignore[arg-type]
    spec.validate()
    return spec
