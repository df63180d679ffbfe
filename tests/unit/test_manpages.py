# SPDX-License-Identifier: LGPL-2.1-or-later
"""The man pages vmspawnctl(1) and vmspawnd(8): rendered from docs/ by scripts/manpage.py,
shown by the real `man -l` without a warning, and complete: every verb and every option
of vmspawnctl's parser is documented where that verb is, and every option in
`vmspawnd --help` is in vmspawnd(8). So neither `--help` nor docs/ can drift from the
pages unnoticed."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vmspawnctl.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = {"vmspawnctl.1": ROOT / "docs/vmspawnctl.md", "vmspawnd.8": ROOT / "docs/vmspawnd.md"}
# docs/vmspawnctl.md, "run": "takes the same options as `start`".
SAME_OPTIONS_AS = {"run": "start"}


def render(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/manpage.py"), str(PAGES[name]), "-o", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def plain(roff: str) -> str:
    """The roff source as the words a reader sees: escapes and font changes gone."""
    text = roff.replace("\\-", "-").replace("\\e", "\\")
    text = re.sub(r"\\f[BIRP]", "", text)
    return re.sub(r"\\\[u([0-9A-F]{4})\]", lambda m: chr(int(m.group(1), 16)), text)


def entries(roff: str) -> dict[str, list[str]]:
    """Where a page documents a word: each section (.SH, up to the next one) under its
    heading's first word, and each definition (.TP, up to the next macro that ends it) under
    the first word of each comma-separated part of its term ("pause NAME, resume NAME")."""
    text = plain(roff)
    found: dict[str, list[str]] = {}
    for section in re.split(r"^(?=\.SH )", text, flags=re.M):
        if section.startswith(".SH "):
            found.setdefault(section.split()[1].lower(), []).append(section)
    for entry in re.split(r"^(?=\.(?:TP|SS|SH|PP)\b)", text, flags=re.M):
        lines = entry.split("\n")
        if lines[0] == ".TP" and len(lines) > 1:
            for part in lines[1].split(", "):
                if part.strip():
                    found.setdefault(part.split()[0].lower(), []).append(entry)
    return found


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("man")
    return {name: render(name, directory) for name in PAGES}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_man_renders_the_page(pages: dict[str, Path], name: str) -> None:
    if not shutil.which("man"):
        pytest.fail("man (man-db) is not installed: scripts/install and scripts/test install it")
    env = {k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"} | {"MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(["man", "--warnings", "-l", str(pages[name])], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    page, section = name.split(".")
    lines = result.stdout.splitlines()
    assert lines[0].split() == [f"{page.upper()}({section})", page, f"{page.upper()}({section})"]
    assert "NAME" in lines and any(re.match(rf"\s+{page}\s+-\s", line) for line in lines)
    assert all(heading in lines for heading in ("SYNOPSIS", "DESCRIPTION", "SEE ALSO"))


def test_every_verb_and_option_of_vmspawnctl_is_in_its_page(pages: dict[str, Path]) -> None:
    roff = pages["vmspawnctl.1"].read_text()
    documented = entries(roff)
    everywhere = plain(roff)
    parser = build_parser([])  # no verb: the whole parser, start's and run's options included
    for option in option_strings(parser):
        assert mentions(everywhere, option), f"vmspawnctl {option} is not in vmspawnctl(1)"
    missing = []
    for verb, sub in subcommands(parser).items():
        texts = documented.get(verb, []) + documented.get(SAME_OPTIONS_AS.get(verb, verb), [])
        if not texts:
            missing.append(f"the verb {verb}")
            continue
        missing += [
            f"{verb} {option}" for option in sorted(option_strings(sub)) if not any(mentions(text, option) for text in texts)
        ]
    assert not missing, f"not documented where their verb is in docs/vmspawnctl.md: {missing}"


def test_every_option_of_vmspawnd_help_is_in_its_page(pages: dict[str, Path]) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "vmspawnd.daemon", "--help"], capture_output=True, text=True, check=True
    ).stdout
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text)) - {"--help"}
    assert {"--runtime-dir", "--listen", "--log-level"} <= options, help_text
    documented = entries(pages["vmspawnd.8"].read_text())
    terms = "\n".join(text for texts in documented.values() for text in texts)
    assert not [o for o in sorted(options) if not mentions(terms, o)], "vmspawnd(8) lacks options of vmspawnd --help"
    for unit in ("vmspawnd.socket", "vmspawnd.service", "vmspawnd-guests.service"):
        assert unit in documented, f"vmspawnd(8) has no entry for {unit}"


def test_the_renderer_guards_roff_syntax(tmp_path: Path) -> None:
    """Text that roff would misread: a line starting with '.', backslashes, options' minus
    signs, non-ASCII; and a first heading that is no NAME(SECTION) is refused."""
    source = tmp_path / "x.md"
    source.write_text(
        "# demo(7)\n\n## Name\n\ndemo — test\n\n## Bits\n\nA line\n.that starts with a dot, a \\\\ backslash,"
        " `--opt` and “quotes”.\n"
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/manpage.py"), str(source)], capture_output=True, text=True, check=True
    ).stdout
    assert '.TH "DEMO" "7"' in out
    assert "demo \\- test" in out
    assert "\n\\&.that starts" in out
    assert "\\fB\\-\\-opt\\fR" in out and "\\[u201C]quotes\\[u201D]" in out and "\\e backslash" in out
    source.write_text("# Not a page\n\ntext\n")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/manpage.py"), str(source)], capture_output=True, text=True)
    assert bad.returncode != 0 and "NAME(SECTION)" in bad.stderr
