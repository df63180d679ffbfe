# SPDX-License-Identifier: LGPL-2.1-or-later
"""systemd-vmspawn 259's options, on the client side (start_spec.py turns them into a VmSpec).

Same spelling and parsing rules as systemd-vmspawn 259 (getopt with '+': the first
non-option argument and everything after it is kernel command line). Everything is
validated here, before the daemon is contacted, and a malformed option exits with status
2 and a message naming the option and its accepted forms. Relative paths are resolved
against the caller's cwd, and what vmspawn reads from its own context (credential files,
$CREDENTIALS_DIRECTORY, $SYSTEMD_VMSPAWN_QEMU_EXTRA, $SYSTEMD_VMSPAWN_NETWORK_MAC,
$TERM, machine images, boot entries, the image's GPT) is read here with the caller's
rights, so the daemon never opens a path on a client's behalf.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
from collections.abc import Callable

from vmspawnd import override
from vmspawnd.errors import InvalidSpec
from vmspawnd.spec import (
    SCOPE_PROPERTIES,
    SSH_KEY_TYPES,
    BindMount,
    ConsoleMode,
    check_property,
    is_valid_user_name,
    parsers,
)

BOOLEAN_FORMS = "a boolean (1, yes, y, true, t, on or 0, no, n, false, f, off)"
TRISTATE_FORMS = BOOLEAN_FORMS + " or 'auto'"
SIZE_FORMS = "a size in bytes with an optional K, M, G, T, P or E suffix (base 1024), e.g. 2G or 1.5G"


def _typed(parse: Callable[[str], object], forms: str) -> Callable[[str], object]:
    """Wrap a parser so argparse reports one sentence: 'argument --option: invalid size '12Q': expected FORMS'.

    The parsers name what they got and the accepted forms themselves (vmspawnd.spec.parsers'
    convention); `forms` is added only to a message that does not already say what is expected,
    so the two are never glued together."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(_with_forms(str(exc), text, forms)) from None

    return convert


def _with_forms(message: str, text: str, forms: str) -> str:
    """`message` as the tail of argparse's 'argument --option: ' sentence, naming the forms once."""
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]  # "Invalid size …" continues a sentence
    if "expected" in message:
        return message
    if repr(text) not in message:
        message = f"invalid value {text!r}: {message}"
    return f"{message}; expected {forms}"


def _absolute(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty path; expected a file name, absolute or relative to the current directory")
    return os.path.normpath(os.path.join(os.getcwd(), text))


def _machine_name(text: str) -> str:
    if text == "":
        return ""  # vmspawn: an empty -M clears it
    if not parsers.is_valid_hostname(text):
        raise argparse.ArgumentTypeError(
            f"invalid machine name {text!r}; expected a valid hostname: 1-64 characters of letters, digits, "
            "'-' and '.', not starting or ending with '-' or '.'"
        )
    return text


def _cpus(text: str) -> str:
    """Passed verbatim to -smp (so QEMU topology syntax works), once QEMU's rules hold:
    a zero or malformed count is refused here rather than by QEMU (parsers.parse_smp)."""
    try:
        return parsers.parse_smp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None


def _firmware(text: str) -> str:
    if text == "list":
        return text
    if not (text.startswith(("/", "./"))):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected 'list' or the path of a firmware descriptor, absolute or starting with './'"
        )
    return os.path.normpath(os.path.join(os.getcwd(), text))


def _tpm_state(text: str) -> str:
    """vmspawn 259: a path (absolute or ./) first, then a boolean or auto; empty means off."""
    if text.startswith(("/", "./")):
        return os.path.normpath(os.path.join(os.getcwd(), text))
    if text == "":
        return "off"
    if text == "auto":
        return "auto"
    try:
        return "auto" if parsers.parse_boolean(text) else "off"
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected 'auto', a boolean, or a path (absolute or starting with './')"
        ) from None


def _grow_image(text: str) -> int | None:
    if text == "":
        return None
    try:
        size = parsers.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(_with_forms(str(exc), text, SIZE_FORMS) + ", or empty") from None
    return size


def _smbios11(text: str) -> str:
    if "\0" in text:
        raise argparse.ArgumentTypeError("SMBIOS type 11 string must not contain NUL; expected a UTF-8 string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("SMBIOS type 11 string is not valid UTF-8; expected a UTF-8 string") from None
    return text


def _slice(text: str) -> str:
    try:
        name = parsers.mangle_unit_name(text, ".slice")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not name.endswith(".slice"):
        raise argparse.ArgumentTypeError(f"invalid slice {text!r}: {name} is not a slice unit; expected NAME or NAME.slice")
    return name


def _property(text: str) -> str:
    try:
        check_property(text)
    except InvalidSpec as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None
    return text


def _private_users(text: str) -> str:
    shift, count = parsers.parse_private_users(text)
    return f"{shift}:{count}"


def _bind(read_only: bool) -> Callable[[str], BindMount]:
    def convert(text: str) -> BindMount:
        try:
            source, target = parsers.parse_bind(text, os.getcwd())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not os.path.isdir(source):
            raise argparse.ArgumentTypeError(
                f"invalid bind mount {text!r}: {source} is not a directory (virtiofs shares directories only); "
                "expected SOURCE[:TARGET]"
            )
        return BindMount(source=source, target=target, read_only=read_only)

    return convert


def _user_name(text: str) -> str:
    if not is_valid_user_name(text):
        raise argparse.ArgumentTypeError(
            f"invalid user or group name {text!r}; expected letters, digits, '_', '-' and '.', not starting with a digit or '-'"
        )
    return text


def _bind_user_shell(text: str) -> str:
    if text.startswith("/"):
        return text
    try:
        return "yes" if parsers.parse_boolean(text) else "no"
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {BOOLEAN_FORMS} or an absolute path") from None


def _forward_journal(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty path; expected FILE.journal or a directory")
    return os.path.normpath(os.path.join(os.getcwd(), text))


def _ssh_key_type(text: str) -> str:
    if text not in SSH_KEY_TYPES:
        raise argparse.ArgumentTypeError(f"invalid key type {text!r}; expected one of {', '.join(SSH_KEY_TYPES)}")
    return text


def _set_credential(text: str) -> tuple[str, bytes]:
    return parsers.parse_set_credential(text)


def _load_credential(text: str) -> tuple[str, bytes]:
    """Read the source with the caller's rights: a file, an AF_UNIX stream socket, or one of
    the caller's own credentials in $CREDENTIALS_DIRECTORY."""
    cred_id, source = parsers.split_load_credential(text)
    if parsers.credential_source_kind(source) == "credential":
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise argparse.ArgumentTypeError(
                f"credential {source!r} is one of our own credentials, but $CREDENTIALS_DIRECTORY is not set; "
                "expected ID:PATH with a '/' in PATH, or run with credentials"
            )
        path = os.path.join(directory, source)
    else:
        path = os.path.join(os.getcwd(), source)
    try:
        st = os.stat(path)
        if stat.S_ISSOCK(st.st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                return cred_id, b"".join(chunks)
        with open(path, "rb") as f:
            return cred_id, f.read()
    except OSError as exc:
        # The form was right: say what failed, and what the path has to be.
        raise argparse.ArgumentTypeError(
            f"cannot read {path} for credential {cred_id!r}: {exc.strerror}; expected a readable file or AF_UNIX stream socket"
        ) from None


class _Accumulate(argparse.Action):
    """Append a converted value; an empty argument clears the list (vmspawn's rule for -s)."""

    @override
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None
    ) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        if values == "" and self.metavar == "STRING":
            items = []
        else:
            items.append(values)
        setattr(namespace, self.dest, items)


class _Ordered(argparse.Action):
    """Record (kind, value) in one list so credentials keep the command line's order."""

    @override
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None
    ) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append(values)
        setattr(namespace, self.dest, items)


class _FirmwareList(argparse.Action):
    """`--firmware=list` prints the descriptor search result and exits 0, before anything else."""

    @override
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None
    ) -> None:
        if values == "list":
            from vmspawnd.spec.firmware import find_descriptor_paths

            for path in find_descriptor_paths(os.environ.get("XDG_CONFIG_HOME")):
                print(path)
            sys.stdout.flush()
            parser.exit(0)
        setattr(namespace, self.dest, values)


class _Network(argparse.Action):
    """-n and --network-user-mode pick one network stack; the last one given wins."""

    @override
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None
    ) -> None:
        namespace.network = self.const


def add_start_options(parser: argparse.ArgumentParser) -> None:
    """The systemd-vmspawn 259 options, grouped like its man page."""
    parser.add_argument("-q", "--quiet", action="store_true", help="suppress status messages")
    parser.add_argument("--no-pager", action="store_true", help="accepted for compatibility (vmspawnctl start does not page)")
    parser.add_argument("--no-ask-password", action="store_true", help="accepted for compatibility (the daemon never asks)")

    img = parser.add_argument_group("Image options")
    img.add_argument("-D", "--directory", type=_absolute, metavar="PATH", help="root file system directory, shared with virtiofs")
    img.add_argument("-i", "--image", type=_absolute, metavar="PATH", help="root disk image (raw file or block device)")

    host = parser.add_argument_group("Host configuration")
    host.add_argument(
        "--cpus",
        "--qemu-smp",
        dest="cpus",
        metavar="CPUS",
        type=_cpus,
        help="number of CPUs, passed verbatim to -smp (default 1)",
    )
    host.add_argument(
        "--ram",
        "--qemu-mem",
        dest="ram",
        metavar="BYTES",
        type=_typed(parsers.parse_size, SIZE_FORMS),
        help="guest memory (default 2G)",
    )
    host.add_argument(
        "--kvm",
        "--qemu-kvm",
        dest="kvm",
        metavar="BOOL|auto",
        type=_typed(parsers.parse_tristate, TRISTATE_FORMS),
        help="use KVM (default auto: if /dev/kvm exists)",
    )
    host.add_argument(
        "--vsock",
        "--qemu-vsock",
        dest="vsock",
        metavar="BOOL|auto",
        type=_typed(parsers.parse_tristate, TRISTATE_FORMS),
        help="add a vhost-vsock device (default auto)",
    )
    host.add_argument(
        "--vsock-cid",
        metavar="CID",
        type=_typed(parsers.parse_vsock_cid, "empty (automatic) or a number 3…4294967294"),
        help="guest CID (default: derived from the machine name)",
    )
    host.add_argument(
        "--tpm",
        metavar="BOOL|auto",
        type=_typed(parsers.parse_tristate, TRISTATE_FORMS),
        help="software TPM with swtpm (default auto: if swtpm is installed)",
    )
    host.add_argument(
        "--tpm-state", metavar="PATH|auto|off", type=_tpm_state, help="where the TPM state is kept (default auto: IMAGE.tpmstate)"
    )
    host.add_argument("--linux", type=_absolute, metavar="PATH", help="kernel for direct kernel boot")
    host.add_argument(
        "--initrd",
        dest="initrds",
        action="append",
        type=_absolute,
        metavar="PATH",
        help="initrd (repeatable; concatenated); requires --linux",
    )
    host.add_argument("-n", "--network-tap", action=_Network, nargs=0, const="tap", help="TAP networking (vt-NAME)")
    host.add_argument("--network-user-mode", action=_Network, nargs=0, const="user", help="user-mode (slirp) networking")
    host.add_argument(
        "--firmware",
        action=_FirmwareList,
        type=_firmware,
        metavar="PATH|list",
        help="firmware descriptor to use; 'list' prints the candidates and exits",
    )
    host.add_argument(
        "--discard-disk",
        metavar="BOOL",
        type=_typed(parsers.parse_boolean, BOOLEAN_FORMS),
        help="pass discard requests to the image (default yes)",
    )
    host.add_argument(
        "--secure-boot",
        metavar="BOOL|auto",
        type=_typed(parsers.parse_tristate, TRISTATE_FORMS),
        help="require (or refuse) Secure Boot firmware (default auto)",
    )
    host.add_argument(
        "-G",
        "--grow-image",
        metavar="BYTES",
        type=_grow_image,
        help="grow the image file to at least this size (rounded up to 4096)",
    )
    host.add_argument(
        "-s",
        "--smbios11",
        action=_Accumulate,
        type=_smbios11,
        metavar="STRING",
        default=[],
        help="SMBIOS type 11 string for the guest (repeatable; empty clears)",
    )
    host.add_argument(
        "--notify-ready",
        metavar="BOOL",
        type=_typed(parsers.parse_boolean, BOOLEAN_FORMS),
        help="wait for the guest's READY=1 (default yes)",
    )

    sys_ = parser.add_argument_group("System identity options")
    sys_.add_argument(
        "-M",
        "--machine",
        dest="name",
        type=_machine_name,
        metavar="NAME",
        help="machine name (default: from the image or directory)",
    )
    sys_.add_argument(
        "--uuid", type=_typed(parsers.parse_uuid, "32 hex digits or a UUID, not all zero"), help="SMBIOS system UUID"
    )

    prop = parser.add_argument_group("Property options")
    prop.add_argument("-S", "--slice", type=_slice, metavar="SLICE", help="slice for the VM's scope")
    prop.add_argument(
        "--property",
        dest="properties",
        action="append",
        type=_property,
        metavar="NAME=VALUE",
        help="scope property, one of: " + ", ".join(sorted(SCOPE_PROPERTIES)),
    )
    prop.add_argument(
        "--register",
        metavar="BOOL|auto",
        type=_typed(parsers.parse_tristate, TRISTATE_FORMS),
        help=(
            "register with systemd-machined: yes (fail if impossible), no, or auto (default: if machined runs; v261's tri-state)"
        ),
    )
    prop.add_argument("--keep-unit", action="store_true", help="run in the daemon's unit instead of a scope")

    user = parser.add_argument_group("User namespacing options")
    user.add_argument(
        "--private-users",
        metavar="UIDBASE[:NUIDS]",
        type=_typed(_private_users, "UIDBASE[:NUIDS], e.g. 100000:65536"),
        help="UID range for the root directory's virtiofsd",
    )

    mounts = parser.add_argument_group("Mount options")
    mounts.add_argument(
        "--bind",
        dest="binds",
        action=_Ordered,
        type=_bind(False),
        metavar="SOURCE[:TARGET]",
        help="share a host directory read-write",
    )
    mounts.add_argument(
        "--bind-ro",
        dest="binds",
        action=_Ordered,
        type=_bind(True),
        metavar="SOURCE[:TARGET]",
        help="share a host directory read-only",
    )
    mounts.add_argument(
        "--extra-drive", dest="extra_drives", action="append", type=_absolute, metavar="PATH", help="additional disk (repeatable)"
    )
    mounts.add_argument(
        "--bind-user",
        dest="bind_users",
        action="append",
        type=_user_name,
        metavar="NAME",
        help="bind a host user's home and account into the guest",
    )
    mounts.add_argument(
        "--bind-user-shell", metavar="BOOL|PATH", type=_bind_user_shell, help="shell of bound users (requires --bind-user)"
    )
    mounts.add_argument(
        "--bind-user-group",
        dest="bind_user_groups",
        action="append",
        type=_user_name,
        metavar="GROUP",
        help="extra group for bound users (requires --bind-user)",
    )

    integ = parser.add_argument_group("Integration options")
    integ.add_argument(
        "--forward-journal",
        metavar="FILE|DIR",
        type=_forward_journal,
        help="forward the guest's journal to this file or directory",
    )
    integ.add_argument(
        "--pass-ssh-key",
        metavar="BOOL",
        type=_typed(parsers.parse_boolean, BOOLEAN_FORMS),
        help="generate an SSH key and pass it to the guest (default yes)",
    )
    integ.add_argument(
        "--ssh-key-type",
        metavar="TYPE",
        type=_ssh_key_type,
        help="type of that key: " + ", ".join(SSH_KEY_TYPES) + " (default ed25519)",
    )

    con = parser.add_argument_group("Input/output options")
    con.add_argument(
        "--console",
        metavar="MODE",
        type=_typed(_console_mode, "interactive, read-only, native or gui"),
        help="interactive, read-only, native or gui (default interactive)",
    )
    con.add_argument(
        "--qemu-gui", dest="console", action="store_const", const=ConsoleMode.GUI.value, help="same as --console=gui"
    )
    con.add_argument(
        "--background",
        metavar="COLOR",
        type=_typed(parsers.parse_background, "an ANSI SGR color such as 41 or 48;2;R;G;B, or empty"),
        help="console background tint (validated; see docs/deviations.md)",
    )

    cred = parser.add_argument_group("Credentials")
    cred.add_argument(
        "--load-credential",
        dest="credentials",
        action=_Ordered,
        type=_typed(_load_credential, "ID:PATH or ID:CREDENTIAL"),
        metavar="ID:PATH",
        help="pass a file's content (or one of our credentials) as credential ID",
    )
    cred.add_argument(
        "--set-credential",
        dest="credentials",
        action=_Ordered,
        type=_typed(_set_credential, "ID:VALUE (C escapes allowed in VALUE)"),
        metavar="ID:VALUE",
        help="pass VALUE as credential ID",
    )

    parser.add_argument("kernel_cmdline", nargs=argparse.REMAINDER, metavar="ARGS", help="kernel command line words")
    parser.set_defaults(network=None)


def _console_mode(text: str) -> str:
    accepted = [m.value for m in ConsoleMode if m is not ConsoleMode.HEADLESS]
    if text not in accepted:
        raise ValueError(f"invalid console mode {text!r}")
    return text
