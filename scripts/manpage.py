#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Render a man page from its markdown in docs/: `python3 scripts/manpage.py docs/vmspawnctl.md`
writes vmspawnctl(1) in roff (man(7) macros) to stdout, or to `-o FILE`.

docs/vmspawnctl.md and docs/vmspawnd.md are the one source of both the markdown reference
and the man pages; tests/unit/test_manpages.py checks that every option and verb of the
parsers is in them, so `--help` and the pages cannot drift apart unnoticed. mistune (a
maintained CommonMark parser, with its definition-list and table plugins) parses; this file
only renders its syntax tree, for the few constructs those pages use:

  # NAME(SECTION)          the page's .TH line
  ## Heading, ### Sub      .SH HEADING, .SS Sub (#### too: man(7) has two levels)
  `TERM`<newline>: text    definition lists: .TP with the term in bold (options, verbs)
  indented/fenced code     .nf … .fi, indented
  - item, * item           .IP \\(bu
  | table |                one .TP entry per row: the first cell, then "Header: cell" lines
  `code`, **strong**, *em*  bold, bold, italic

Everything not ASCII is written as a groff \\[uXXXX] escape, so no input encoding is assumed.
docs/dependencies.md says why this and not pandoc, argparse-manpage or DocBook.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mistune

REPO = Path(__file__).resolve().parents[1]
Token = Mapping[str, Any]


def escape(text: str) -> str:
    """Plain text for roff: backslashes, hyphens that are minus signs in options, non-ASCII."""
    out = []
    for char in text.replace("\\", "\\e"):
        if ord(char) < 128:
            out.append(char)
        else:
            out.append(f"\\[u{ord(char):04X}]")
    return "".join(out)


def escape_literal(text: str) -> str:
    """A literal (code, an option): every '-' is a real minus, so it can be copied and searched."""
    return escape(text).replace("-", "\\-")


def inline(tokens: Iterable[Token]) -> str:
    parts = []
    for token in tokens:
        kind = token["type"]
        if kind == "text":
            parts.append(escape(token["raw"]))
        elif kind == "codespan":
            parts.append(f"\\fB{escape_literal(token['raw'])}\\fR")
        elif kind == "strong":
            parts.append(f"\\fB{inline(token['children'])}\\fR")
        elif kind == "emphasis":
            parts.append(f"\\fI{inline(token['children'])}\\fR")
        elif kind == "link":
            parts.append(inline(token["children"]))
        elif kind == "softbreak":
            parts.append("\n")
        elif kind == "linebreak":
            parts.append("\n.br\n")
        elif kind == "inline_html":
            continue
        else:
            raise ValueError(f"no man rendering for inline markdown {kind!r}")
    return protect_lines("".join(parts))


def protect_lines(text: str) -> str:
    """A text line starting with '.' or "'" would be read as a request: guard it with \\&."""
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


class Renderer:
    def __init__(self, version: str) -> None:
        self.version = version
        self.out: list[str] = []
        self.section = ""

    def emit(self, *lines: str) -> None:
        self.out.extend(lines)

    def title(self, text: str) -> None:
        match = re.fullmatch(r"([\w.-]+)\((\d)\)", text)
        if not match:
            raise ValueError(f"the page's first heading must be NAME(SECTION), not {text!r}")
        name, number = match.groups()
        self.emit(f'.TH "{name.upper()}" "{number}" "" "vmspawnd {self.version}" "{name}"')

    def blocks(self, tokens: Iterable[Token]) -> None:
        for token in tokens:
            self.block(token)

    def block(self, token: Token) -> None:
        kind = token["type"]
        if kind == "blank_line":
            return
        if kind == "block_html":
            for line in token["raw"].strip().removeprefix("<!--").removesuffix("-->").strip().splitlines():
                self.emit(f'.\\" {line}')
        elif kind == "heading":
            text = "".join(child.get("raw", "") for child in token["children"])
            level = token["attrs"]["level"]
            if level == 1:
                self.title(text)
            elif level == 2:
                self.section = text
                self.emit(f".SH {escape(text.upper())}")
            else:
                self.emit(f".SS {escape(text)}")
        elif kind == "paragraph":
            text = inline(token["children"])
            if self.section.lower() == "name":
                # whatis/apropos read "NAME \- description" (man-pages(7)).
                text = text.replace(" \\[u2014] ", " \\- ", 1)
            self.emit(".PP", text)
        elif kind == "block_text":
            self.emit(inline(token["children"]))
        elif kind == "block_code":
            self.emit(".PP", ".RS 4", ".nf")
            self.emit(*(protect_lines(escape_literal(line)) for line in token["raw"].rstrip("\n").split("\n")))
            self.emit(".fi", ".RE")
        elif kind == "def_list":
            for child in token["children"]:
                if child["type"] == "def_list_head":
                    self.emit(".TP", inline(child["children"]))
                else:
                    self.definition(child["children"])
        elif kind == "list":
            for item in token["children"]:
                self.emit(".IP \\(bu 2")
                self.definition(item["children"])
        elif kind == "table":
            self.table(token)
        else:
            raise ValueError(f"no man rendering for markdown block {kind!r}")

    def definition(self, children: Sequence[Token]) -> None:
        """The body of a .TP or .IP item: paragraphs after the first continue the indent."""
        for index, child in enumerate(children):
            if index and child["type"] in ("paragraph", "block_text"):
                self.emit('.IP "" 4' if child["type"] == "paragraph" else ".br", inline(child["children"]))
            elif child["type"] == "paragraph":
                self.emit(inline(child["children"]))
            else:
                self.block(child)

    def table(self, token: Token) -> None:
        head, body = token["children"]
        headers = [inline(cell["children"]) for cell in head["children"]]
        for row in body["children"]:
            cells = [inline(cell["children"]) for cell in row["children"]]
            self.emit(".TP", cells[0])
            lines = [f"\\fI{header}\\fR: {cell}" for header, cell in zip(headers[1:], cells[1:], strict=True) if cell]
            self.emit("\n.br\n".join(lines))


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def render(markdown: str, version: str | None = None) -> str:
    parse = mistune.create_markdown(renderer=None, plugins=["def_list", "table"])
    tokens = parse(markdown)
    assert isinstance(tokens, list)
    renderer = Renderer(version or project_version())
    renderer.blocks(tokens)
    if not renderer.out or not any(line.startswith(".TH ") for line in renderer.out):
        raise ValueError("no NAME(SECTION) heading: not a man page")
    return "\n".join(renderer.out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a man page from markdown in docs/.")
    parser.add_argument("source", type=Path, help="e.g. docs/vmspawnctl.md")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    page = render(args.source.read_text(encoding="utf-8"))
    if args.output:
        args.output.write_text(page, encoding="ascii")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
