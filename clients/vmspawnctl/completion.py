# SPDX-License-Identifier: LGPL-2.1-or-later
"""Shell completion for vmspawnctl, generated from its own parser with shtab:
`python -m vmspawnctl.completion bash|zsh` prints the script (scripts/install installs both).

shtab turns the parser into a static script: verbs, options and `choices` come from the
parser itself, so a new option completes without touching this file. What the parser
cannot say, this module adds before generating: the values of options that take one from
a fixed set (their types are converters, not `choices`), which options name files or
directories, and which positionals are machine names. Machine names are asked of the
running daemon at Tab time with `vmspawnctl list --no-legend` (one short Varlink call,
as machinectl's completion runs `machinectl list --no-legend`), honouring an `--address`
already on the command line. Nothing here runs when vmspawnctl itself runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vmspawnd.spec import SSH_KEY_TYPES, ConsoleMode

from .output import JSON_MODES

BOOLEAN = ("yes", "no")
TRISTATE = (*BOOLEAN, "auto")
SIGNALS = ("SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", "SIGRTMIN+4", "SIGUSR1", "SIGUSR2")
FILE, DIRECTORY, USER, GROUP, MACHINE = "file", "directory", "user", "group", "machine"

# Option → (the fixed values Tab offers, the kind of name it also completes).
OPTION_VALUES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "--kvm": (TRISTATE, None),
    "--vsock": (TRISTATE, None),
    "--tpm": (TRISTATE, None),
    "--secure-boot": (TRISTATE, None),
    "--register": (TRISTATE, None),
    "--discard-disk": (BOOLEAN, None),
    "--notify-ready": (BOOLEAN, None),
    "--pass-ssh-key": (BOOLEAN, None),
    # headless is vmspawn 261's and reachable over Varlink only (docs/vmspawnctl.md).
    "--console": (tuple(m.value for m in ConsoleMode if m is not ConsoleMode.HEADLESS), None),
    "--ssh-key-type": (SSH_KEY_TYPES, None),
    "--json": (JSON_MODES, None),
    "--signal": (SIGNALS, None),
    "--firmware": (("list",), FILE),
    "--tpm-state": (("auto", "off"), FILE),
    "--bind-user-shell": (BOOLEAN, FILE),
    "--directory": ((), DIRECTORY),
    "--image": ((), FILE),
    "--linux": ((), FILE),
    "--initrd": ((), FILE),
    "--extra-drive": ((), FILE),
    "--forward-journal": ((), FILE),
    "--bind": ((), DIRECTORY),
    "--bind-ro": ((), DIRECTORY),
    "--bind-user": ((), USER),
    "--bind-user-group": ((), GROUP),
    "--address": ((), FILE),
    # snapshot --output and start --from-snapshot name bundle directories (or, the latter,
    # a bundle in the daemon's store, which `vmspawnctl snapshot list` shows).
    "--output": ((), DIRECTORY),
    "--from-snapshot": ((), DIRECTORY),
}

# The shell functions each kind of name calls: bash's are run with the word being completed
# and print candidates, one a line; zsh's are _arguments actions.
FUNCTIONS = {
    FILE: {"bash": "_shtab_compgen_files", "zsh": "_files"},
    DIRECTORY: {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"},
    USER: {"bash": "_vmspawnctl_users", "zsh": "_users"},
    GROUP: {"bash": "_vmspawnctl_groups", "zsh": "_groups"},
    MACHINE: {"bash": "_vmspawnctl_machines", "zsh": "_vmspawnctl_machines"},
}

BASH_PREAMBLE = r"""
# vmspawnctl's own completers (vmspawnctl/completion.py). $1 is the word being completed.
_vmspawnctl_machines() {
  local address=() i word
  for ((i = 1; i < COMP_CWORD; i++)); do
    word=${COMP_WORDS[i]}
    if [[ $word == --address ]]; then
      # "--address PATH", or "--address = PATH" where bash split the word at '='
      [[ ${COMP_WORDS[i+1]} == = ]] && ((i++))
      address=(--address="${COMP_WORDS[i+1]}")
    elif [[ $word == --address=* ]]; then
      address=("$word")
    fi
  done
  "${COMP_WORDS[0]}" "${address[@]}" list --no-legend 2>/dev/null </dev/null | while read -r name _; do
    [[ $name == "$1"* ]] && printf '%s\n' "$name"
  done
}
_vmspawnctl_users() {
  compgen -u -- "$1"
}
_vmspawnctl_groups() {
  compgen -g -- "$1"
}
# bash splits "--console=gui" at '=' (COMP_WORDBREAKS): complete the value after it as if
# the option were a word of its own.
_vmspawnctl_completion() {
  if [[ ${COMP_WORDS[COMP_CWORD]} == = || ${COMP_WORDS[COMP_CWORD-1]} == = ]] && ((COMP_CWORD >= 2)); then
    local -a words=("${COMP_WORDS[@]}")
    local cword=$COMP_CWORD
    [[ ${words[cword]} == = ]] && words[cword]=""
    [[ ${words[cword-1]} == = ]] && { unset 'words[cword-1]'; words=("${words[@]}"); ((cword--)); }
    COMP_WORDS=("${words[@]}")
    COMP_CWORD=$cword
  fi
  _shtab_vmspawnctl "$@"
}
"""

ZSH_PREAMBLE = r"""
# vmspawnctl's own completer (vmspawnctl/completion.py): the daemon's machine names. The
# whole line, not $words: _arguments has narrowed that to the verb's own words.
_vmspawnctl_machines() {
  local -a line address names
  local i
  line=(${(z)LBUFFER})
  for ((i = 2; i < ${#line}; i++)); do
    case ${line[i]} in
      --address) address=(--address="${(Q)line[i+1]}") ;;
      --address=*) address=("${(Q)line[i]}") ;;
    esac
  done
  names=(${${(f)"$(${(Q)line[1]} $address list --no-legend 2>/dev/null </dev/null)"}%% *})
  compadd -a names
}
"""


def annotate(parser: argparse.ArgumentParser, shell: str) -> None:
    """Mark up the parser (and its sub-parsers) for shtab: the value sets, the file and
    directory options, and the machine-name positionals."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                annotate(sub, shell)
            continue
        if shell == "zsh" and isinstance(action.metavar, str):
            # zsh's _arguments splits its specs at ':' ("SOURCE[:TARGET]"); shtab does not escape it.
            action.metavar = action.metavar.replace(":", "\\:")
        if not action.option_strings:
            if action.dest == "name":
                set_complete(action, FUNCTIONS[MACHINE])
            elif action.dest == "file":
                set_complete(action, FUNCTIONS[FILE])
            continue
        for option in action.option_strings:
            if option in OPTION_VALUES:
                values, kind = OPTION_VALUES[option]
                if values and kind:
                    # shtab completes either choices or a function: both at once is a function.
                    set_complete(action, values_and_names(option, values, kind))
                elif values:
                    # Only this throw-away parser gets choices; it never parses anything.
                    action.choices = values
                elif kind:
                    set_complete(action, FUNCTIONS[kind])
                break


def set_complete(action: argparse.Action, how: object) -> None:
    """shtab reads an action's `complete` attribute (its documented way to name a completer)."""
    vars(action)["complete"] = how


def values_and_names(option: str, values: Sequence[str], kind: str) -> dict[str, object]:
    """A completer offering fixed `values` and names of `kind` (`--firmware=list` or a file),
    as a function for each shell (bash's name says "files", so shtab completes it with -o
    filenames)."""
    name = f"_vmspawnctl_values_or_{kind}s_{option.lstrip('-').replace('-', '_')}"
    words = " ".join(values)
    bash = f'{name}() {{\n  compgen -W \'{words}\' -- "$1"\n  {FUNCTIONS[kind]["bash"]} "$1"\n}}\n'
    zsh = f"{name}() {{\n  compadd -- {words}\n  {FUNCTIONS[kind]['zsh']}\n}}\n"
    return {"bash": name, "zsh": name, "preamble": {"bash": bash, "zsh": zsh}}


def value_options(parser: argparse.ArgumentParser) -> set[str]:
    """The long options, of the parser and its sub-parsers, that take a value."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= value_options(sub)
        elif action.nargs != 0:
            found |= {o for o in action.option_strings if o.startswith("--")}
    return found


def accept_equals(script: str, parser: argparse.ArgumentParser) -> str:
    """Let zsh complete `--console=gui` as well as `--console gui` (getopt takes both): in an
    _arguments spec that is `--console=[…]`, which shtab does not write."""
    import re

    for option in sorted(value_options(parser)):
        script = re.sub(rf'(?<=["{{,*]){re.escape(option)}(?=[\[}},])', option + "=", script)
    return script


def generate(shell: str) -> str:
    """The completion script for `shell` ("bash" or "zsh")."""
    import shtab

    from .main import build_parser

    parser = build_parser([])  # no verb given: the whole parser, start's and run's options included
    annotate(parser, shell)
    if shell == "bash":
        script = shtab.complete(parser, "bash", preamble=BASH_PREAMBLE)
        # Register the '='-aware wrapper instead of shtab's function.
        return script.replace(
            "complete -o bashdefault -F _shtab_vmspawnctl vmspawnctl",
            "complete -o bashdefault -F _vmspawnctl_completion vmspawnctl",
        )
    if shell == "zsh":
        return accept_equals(str(shtab.complete(parser, "zsh", preamble=ZSH_PREAMBLE)), parser)
    raise ValueError(f"no completion for shell {shell!r}; expected bash or zsh")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmspawnctl.completion", description="Print vmspawnctl's shell completion script."
    )
    parser.add_argument("shell", choices=("bash", "zsh"))
    args = parser.parse_args(argv)
    sys.stdout.write(generate(args.shell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
