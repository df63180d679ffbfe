# SPDX-License-Identifier: LGPL-2.1-or-later
"""docs/vmspawnctl.md and the parser say the same: every documented command and option
exists, every one the parser has is documented, and documented values are accepted.

How the page is read (the conventions it keeps):

* A definition-list term is a line followed by one starting with ": ". Its backticked
  spans name options (`--ram=BYTES`, `-n N`, `[-s|--signal=SIG]`). In "Common options"
  they are vmspawnctl's own; in "Commands other than …" each term starts with its command
  (`stop NAME [--deadline=SECONDS]`); in the sections named after a command (`## log`)
  they are that command's, as are the options of its indented `vmspawnctl VERB …` line.
* `run` takes `start`'s options (its section says so); `start`'s extensions (`--wait`,
  `--timeout`) are documented under "Commands other than …".
* Values: the lower-case alternatives of a term (`BOOL|auto`, `png|ppm`), and for MODE,
  TYPE and SIG the backticked words of its description (`interactive`, `ed25519`,
  `SIGTERM`), must be accepted; BOOL must take systemd's booleans; the Examples parse.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from vmspawnctl.main import build_parser, signal_number

DOC = Path(__file__).resolve().parents[2] / "docs" / "vmspawnctl.md"
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
SPAN = re.compile(r"`([^`]+)`")
VALUE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9+-]*")
ENUMERATED = ("MODE", "TYPE", "SIG")
BOOLEANS = ("yes", "no", "true", "false", "1", "0", "on", "off")
HELP = {"-h", "--help"}


def sections() -> dict[str, list[str]]:
    """The page's `## ` sections (with their sub-sections), by heading."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def terms(lines: list[str]) -> list[tuple[str, str]]:
    """(term, description) of each definition-list entry."""
    out = []
    for index, line in enumerate(lines[:-1]):
        if lines[index + 1].startswith(": ") and line.strip():
            description = [lines[index + 1][2:]]
            for follow in lines[index + 2 :]:
                if not follow.startswith("  ") or not follow.strip():
                    break
                description.append(follow.strip())
            out.append((line, " ".join(description)))
    return out


def options_in(text: str) -> set[str]:
    return {o for span in SPAN.findall(text) for o in OPTION.findall(span)}


def synopsis_options(lines: list[str], verb: str) -> set[str]:
    found: set[str] = set()
    for line in lines:
        if line.startswith(f"    vmspawnctl {verb} "):
            found |= set(OPTION.findall(line[len(f"    vmspawnctl {verb} ") :]))
    return found


def documented() -> dict[str, set[str]]:
    """Command → its documented options; "" is vmspawnctl itself."""
    page = sections()
    commands: dict[str, set[str]] = {"": options_in(" ".join(t for t, _ in terms(page["Common options"])))}
    for term, _ in terms(page["Commands other than start, console, log and run"]):
        for entry in term.split("`, `"):
            verb = entry.strip("`").split()[0]
            commands.setdefault(verb, set()).update(options_in(f"`{entry.strip('`')}`"))
    for verb in ("start", "console", "log", "run"):
        lines = page[verb]
        commands.setdefault(verb, set()).update(options_in(" ".join(t for t, _ in terms(lines))) | synopsis_options(lines, verb))
    # run takes start's options (its section says so), not start's own extensions.
    extensions = options_in(
        next(t for t, _ in terms(page["Commands other than start, console, log and run"]) if t.startswith("`start"))
    )
    commands["run"] |= {o for o in options_in(" ".join(t for t, _ in terms(page["start"])))} - extensions
    return commands


def parser_commands() -> dict[str, set[str]]:
    parser = build_parser(["start"])  # the full parser: start's and run's options included
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {"": {o for a in parser._actions for o in a.option_strings}}
    for verb, child in sub.choices.items():
        out[verb] = {o for a in child._actions for o in a.option_strings} - HELP
    return out


def test_every_command_is_documented_and_every_documented_command_exists() -> None:
    assert set(documented()) == set(parser_commands())


@pytest.mark.parametrize("verb", sorted(parser_commands()))
def test_every_option_is_documented_and_every_documented_option_exists(verb: str) -> None:
    doc, parser = documented()[verb], parser_commands()[verb]
    undocumented, unknown = sorted(parser - doc), sorted(doc - parser)
    assert not undocumented, f"vmspawnctl {verb}: {undocumented} in the parser, not in docs/vmspawnctl.md"
    assert not unknown, f"vmspawnctl {verb}: {unknown} in docs/vmspawnctl.md, not in the parser"


def documented_values() -> list[tuple[str, str, str]]:
    """(command, option, value) for each value the page says an option takes."""
    page = sections()
    entries = [("", t, d) for t, d in terms(page["Common options"])]
    for term, description in terms(page["Commands other than start, console, log and run"]):
        entries.append((term.strip("`").split()[0], term, description))
    for verb in ("start", "log"):
        entries += [(verb, t, d) for t, d in terms(page[verb])]
    values = []
    for verb, term, description in entries:
        for span in SPAN.findall(term):
            for option, placeholder in re.findall(r"(--[\w-]+)=([^\s\]`]+)", span):
                alternatives = placeholder.split("|")
                values += [(verb, option, v) for v in alternatives if re.fullmatch(r"[a-z0-9-]+", v)]
                if "BOOL" in alternatives:
                    values += [(verb, option, v) for v in BOOLEANS]
                if any(p in ENUMERATED for p in alternatives):
                    values += [(verb, option, w) for w in SPAN.findall(description) if VALUE_WORD.fullmatch(w)]
    return values


POSITIONALS = {"status": ["x"], "stop": ["x"], "kill": ["x"], "log": ["x"], "screenshot": ["x", "out.png"], "snapshot": ["x"]}


@pytest.mark.parametrize(("verb", "option", "value"), documented_values())
def test_documented_values_are_accepted(verb: str, option: str, value: str) -> None:
    argv = [verb, *POSITIONALS.get(verb, []), f"{option}={value}"] if verb else [f"{option}={value}", "list"]
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # --firmware=list prints and exits 0; a refused value exits 2
        assert exc.code == 0, f"vmspawnctl {' '.join(argv)} is documented but refused"
        return
    if option == "--signal":  # checked when the command runs, not by argparse
        signal_number(args.signal)


def test_the_options_documented_for_each_value_list_exist() -> None:
    """The value test above only means something if it finds the documented lists."""
    found = {(verb, option) for verb, option, _ in documented_values()}
    for expected in [
        ("start", "--console"),
        ("start", "--ssh-key-type"),
        ("kill", "--signal"),
        ("start", "--tpm-state"),
        ("screenshot", "--format"),
        ("start", "--kvm"),
    ]:
        assert expected in found, expected


def test_the_examples_parse() -> None:
    examples = sections()["start"]
    start = examples.index("### Examples")
    lines = [line.strip() for line in examples[start:] if line.startswith("    vmspawnctl ")]
    assert lines
    for line in lines:
        argv = shlex.split(line)[1:]
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, line


def test_the_documented_default_tint_is_the_one_run_uses() -> None:
    from vmspawnctl.run import default_tint

    documented_tint = re.findall(r"`(48;2;\d+;\d+;\d+)`", "\n".join(sections()["run"]))
    assert documented_tint == [default_tint()]


@pytest.mark.parametrize(
    ("hsv", "rgb"),
    [
        ((130, 75, 20), (12, 51, 19)),  # vmspawn's tint on a black terminal
        ((0, 100, 90), (229, 0, 0)),  # 0.9 × 255 = 229.5: truncated as in C, not rounded
        ((60, 25, 60), (153, 153, 114)),  # run0's yellow on a bright terminal (saturation 25)
        ((359, 50, 50), (127, 63, 64)),  # the last sector
    ],
)
def test_the_tint_follows_systemds_hsv_to_rgb(hsv: tuple[float, float, float], rgb: tuple[int, int, int]) -> None:
    """color-util.c: c = s·v, x = c·(1 − |(h/60) mod 2 − 1|), m = v − c, each channel (· + m)·255
    cast to uint8_t."""
    from vmspawnctl.run import hsv_to_rgb

    assert hsv_to_rgb(*hsv) == rgb
