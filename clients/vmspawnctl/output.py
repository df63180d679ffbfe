# SPDX-License-Identifier: LGPL-2.1-or-later
"""How vmspawnctl writes, by the conventions of systemd's own tools (machinectl, varlinkctl,
journalctl), so that hands and scripts used to those need nothing new:

* ``--json=pretty|short|off``; a bare ``--json`` is ``pretty`` on a terminal and ``short``
  otherwise (systemd's SD_JSON_FORMAT_PRETTY_AUTO). ``short`` is one compact line per object.
* ``--no-legend``: tables without their header and footer, for ``read`` loops and completion.
* Colour: ``$SYSTEMD_COLORS`` decides when set (a boolean, or 16/256/24bit for "on"), else
  ``$NO_COLOR`` (any value) turns it off, else a terminal that is not ``TERM=dumb`` gets it.
* A pager for long output on a terminal, as systemd's ``pager_open()`` picks it:
  ``$SYSTEMD_PAGER``, else ``$PAGER``, else ``less``, else ``more``; empty or ``cat`` means
  none; ``less`` gets ``$SYSTEMD_LESS`` or ``FRSXMK`` (quit if one screen, raw colours).

Stdlib only, and what only the pager needs is imported when it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

JSON_MODES = ("pretty", "short", "off")
PAGER_FALLBACKS = ("less", "more")
DEFAULT_LESS = "FRSXMK"

BOLD = "1"
RED = "31"
GREEN = "32"
YELLOW = "33"
GREY = "90"


def json_mode(text: str) -> str:
    """argparse type of ``--json=MODE``: the mode, or the one-sentence error naming the forms."""
    if text not in JSON_MODES:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r}; expected one of {', '.join(JSON_MODES)} (or --json alone)")
    return text


def expand_bare_json(argv: Sequence[str], on_terminal: bool) -> list[str]:
    """Turn a bare ``--json`` into ``--json=pretty`` on a terminal, ``--json=short`` otherwise.

    getopt's optional arguments take a value only after ``=``; argparse's ``nargs="?"`` would
    swallow the next word, so ``status --json demo`` would read ``demo`` as the mode. Words
    after ``--`` are left alone.
    """
    out = list(argv)
    for index, word in enumerate(out):
        if word == "--":
            break
        if word == "--json":
            out[index] = "--json=" + ("pretty" if on_terminal else "short")
    return out


def dumps(value: object, mode: str) -> str:
    """JSON text in a ``--json`` mode: indented, or compact on one line (no blanks, as systemd's)."""
    if mode == "pretty":
        return json.dumps(value, indent=2)
    return json.dumps(value, separators=(",", ":"))


def parse_boolean_env(text: str | None) -> bool | None:
    """systemd's parse_boolean() for an environment variable: None when unset or not a boolean.
    (Kept here so that deciding on colour imports no parser module.)"""
    if text is None:
        return None
    lowered = text.lower()
    if lowered in ("1", "yes", "y", "true", "t", "on"):
        return True
    if lowered in ("0", "no", "n", "false", "f", "off"):
        return False
    return None


def colour_enabled(stream: IO[str] | IO[bytes], env: Mapping[str, str] | None = None) -> bool:
    """Whether to colour what goes to ``stream`` (systemd's get_color_mode(), in the same order)."""
    env = os.environ if env is None else env
    if (setting := env.get("SYSTEMD_COLORS")) is not None:
        if setting in ("16", "256", "24bit"):
            return True
        if (explicit := parse_boolean_env(setting)) is not None:
            return explicit
        # Anything else is ignored, as systemd ignores an invalid SYSTEMD_COLORS.
    if "NO_COLOR" in env:
        return False
    if env.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def paint(text: str, sgr: str, enabled: bool) -> str:
    """``text`` in an SGR style when colour is enabled; unchanged otherwise."""
    return f"\033[{sgr}m{text}\033[0m" if enabled and sgr else text


def state_style(state: str) -> str:
    """The colour systemctl gives the matching unit states: good green, failed red, in between yellow."""
    return {
        "ready": GREEN,
        "running": GREEN,
        "failed": RED,
        "starting": YELLOW,
        "stopping": YELLOW,
        "paused": YELLOW,
        "stopped": GREY,
    }.get(state, "")


def pager_command(env: Mapping[str, str] | None = None) -> list[str] | None:
    """The pager to run, as argv, or None for none."""
    import shlex
    import shutil

    env = os.environ if env is None else env
    for variable in ("SYSTEMD_PAGER", "PAGER"):
        if (value := env.get(variable)) is not None:
            words = shlex.split(value)
            if not words or words == ["cat"]:
                return None
            return words
    for candidate in PAGER_FALLBACKS:
        if shutil.which(candidate, path=env.get("PATH")):
            return [candidate]
    return None


@contextlib.contextmanager
def paged(enabled: bool, env: Mapping[str, str] | None = None) -> Iterator[IO[bytes]]:
    """Yield where to write long output: a pager's stdin when ``enabled`` and stdout is a
    terminal and a pager is configured, else stdout. The pager is waited for on the way out;
    its quitting early (a closed pipe, Ctrl-C) ends the output quietly."""
    import subprocess  # only here: it costs a one-shot command ~10 ms to import

    env = dict(os.environ if env is None else env)
    command = pager_command(env) if enabled and sys.stdout.isatty() else None
    if command is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    env["LESS"] = env.get("SYSTEMD_LESS", DEFAULT_LESS)
    env.setdefault("LESSCHARSET", "utf-8")
    sys.stdout.flush()
    try:
        pager = subprocess.Popen(command, stdin=subprocess.PIPE, env=env)
    except OSError:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    assert pager.stdin is not None
    try:
        yield pager.stdin
        pager.stdin.close()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        with contextlib.suppress(BrokenPipeError):
            pager.stdin.close()
        while True:
            # The user reads at their pace; Ctrl-C belongs to the pager (less -K quits on it).
            try:
                pager.wait()
                break
            except KeyboardInterrupt:
                continue
