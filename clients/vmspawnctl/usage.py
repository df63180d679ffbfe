# SPDX-License-Identifier: LGPL-2.1-or-later
"""Usage errors that point at the mistake: one line first, then where to read more.

argparse's own error() prints the whole usage block (25 lines for `start`) before the one
line that matters, and an unknown option gets no hint. Here a usage error is that line
and a pointer to `--help`; an unknown option or command gets the closest known one —
first from the names other tools use for the same thing (QEMU, virt-install, virsh), which
plain string similarity misses (`--memory` is closer to `--directory` than to `--ram`),
then by similarity (difflib).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

from vmspawnd import override

EXIT_USAGE = 2

# Spellings of other VM tools → ours. Only suggested where the target exists in the parser.
OPTION_SYNONYMS = {
    "--memory": "--ram",
    "--mem": "--ram",
    "--vcpus": "--cpus",
    "--cpu": "--cpus",
    "--smp": "--cpus",
    "--kernel": "--linux",
    "--initramfs": "--initrd",
    "--name": "--machine",
    "--disk": "--image",
    "--drive": "--extra-drive",
    "--enable-kvm": "--kvm",
    "--graphics": "--console",
    "--display": "--console",
}
# Kernel command line words are positional (vmspawn's ARGS), not an option's value.
CMDLINE_OPTIONS = {"--append", "--cmdline", "--kernel-cmdline", "--kernel-command-line"}
COMMAND_SYNONYMS = {
    "ls": "list",
    "show": "status",
    "info": "status",
    "rm": "remove",
    "delete": "remove",
    "poweroff": "stop",
    "shutdown": "stop",
    "destroy": "terminate",
    "suspend": "pause",
    "restart": "reboot",
    "reset": "reboot",
    "logs": "log",
    "attach": "console",
    "spawn": "start",
    "create": "start",
    "boot": "start",
}
SIMILARITY_CUTOFF = 0.7


class UsageError(Exception):
    """A command line that parses but cannot mean what it says (start_spec.check_arguments)."""


def usage_error(prog: str, message: str) -> NoReturn:
    """The one line, then the pointer; exit status 2 as for every usage error."""
    sys.stderr.write(f"{prog}: {message}\nSee '{prog} --help'.\n")
    sys.exit(EXIT_USAGE)


def closest(word: str, known: Iterable[str], synonyms: dict[str, str]) -> str | None:
    """The known name a mistyped or foreign `word` most likely means, if any is close."""
    import difflib  # only on this error path: `vmspawnctl list` should not pay for it

    names = list(known)
    if synonyms.get(word) in names:
        return synonyms[word]
    matches = difflib.get_close_matches(word, names, n=1, cutoff=SIMILARITY_CUTOFF)
    return matches[0] if matches else None


def unknown_arguments_message(extras: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """What to say about arguments no option or positional took: the first one matters."""
    first = extras[0]
    if not first.startswith("-"):
        return f"unexpected argument {first!r}"
    option = first.split("=", 1)[0]
    if option in CMDLINE_OPTIONS:
        return (
            f"unknown option {option}: kernel command line words go after the options, "
            "without an option name (vmspawnctl start --linux=KERNEL quiet loglevel=3)"
        )
    known = [o for action in parser._actions for o in action.option_strings]
    hint = closest(option, known, OPTION_SYNONYMS)
    return f"unknown option {option}" + (f" (did you mean {hint}?)" if hint else "")


class CommandLineParser(argparse.ArgumentParser):
    """argparse with vmspawnctl's usage errors; subparsers inherit the class."""

    @override
    def error(self, message: str) -> NoReturn:
        choice = re.match(r"argument COMMAND: invalid choice: '([^']*)'", message)
        if choice:
            hint = closest(choice[1], self._commands(), COMMAND_SYNONYMS)
            message = f"unknown command {choice[1]!r}" + (f" (did you mean {hint}?)" if hint else "")
        usage_error(self.prog, message)

    @override
    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._subparser(parsed) or self
            parser.error(unknown_arguments_message(extras, parser))
        return parsed

    def _command_action(self) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)

    def _commands(self) -> list[str]:
        action = self._command_action()
        return list(action.choices) if action is not None else []

    def _subparser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser | None:
        """The command's own parser, whose options an unknown one is compared with."""
        action = self._command_action()
        if action is None:
            return None
        chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
        return chosen if isinstance(chosen, argparse.ArgumentParser) else None
