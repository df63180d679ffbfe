# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnctl's systemd conventions against a real daemon and one real guest: --json modes
(bare --json decided by whether stdout is a terminal), --no-legend, colour on a terminal and
never with NO_COLOR or SYSTEMD_COLORS=0, a paused VM in `list`, what `status` says about the
unit, registration and readiness, `log` through a pager on a terminal only, and Tab
completion in bash and zsh offering the running daemon's machine names.

The terminal is a real pseudo-terminal; the completion scripts are the ones scripts/install
installs, generated from the parser (python -m vmspawnctl.completion), driven by real bash
and zsh. tests/unit/test_cli_output.py covers the same rules without a daemon."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Console, Daemon

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
NAME = "conv"
ANSI = re.compile(rb"\033\[[0-9;]*m")
BIN = str(Path(sys.executable).parent)  # the venv's vmspawnctl, as completion runs it


@pytest.fixture(scope="module")
def vm(daemon: Daemon, guest) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    daemon.call(
        "Spawn",
        {
            "spec": {
                "name": NAME,
                "kvm": False,
                "ram": 256 * MIB,
                "linux": str(guest.kernel),
                "initrds": [str(guest.initrd)],
                "kernelCmdline": ["vmspawnd_test.mode=wait"],
            }
        },
    )
    machine = daemon.call("Describe", {"name": NAME})["machine"]
    with Console(machine) as console:
        console.wait_for(r"VMSPAWND-TEST: acpid-running")
    yield machine
    daemon.call("Terminate", {"name": NAME})
    daemon.call("Remove", {"name": NAME})


def ctl_env(daemon: Daemon, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "SYSTEMD_COLORS", "PAGER", "SYSTEMD_PAGER")}
    return env | {"VMSPAWN_ADDRESS": daemon.address, "TERM": "xterm", "PATH": f"{BIN}:{os.environ['PATH']}"} | extra


def on_terminal(daemon: Daemon, *args: str, timeout: float = 60.0, **env: str) -> bytes:
    """Run vmspawnctl with stdin/stdout/stderr on a fresh pty; everything it wrote."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "vmspawnctl.main", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=ctl_env(daemon, **env),
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"vmspawnctl {' '.join(args)} did not finish; output {output[-2000:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the pty
                break
            if not data:
                break
            output += data
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == 0, output
    return output.replace(b"\r\n", b"\n")


def piped(daemon: Daemon, *args: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vmspawnctl.main", *args], env=ctl_env(daemon, **env), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_json_modes(daemon: Daemon, vm: dict[str, object]) -> None:
    short = piped(daemon, "list", "--json")  # not a terminal: bare --json is short
    assert [m["name"] for m in json.loads(short)] == [NAME]
    assert short == json.dumps(json.loads(short), separators=(",", ":")) + "\n"  # one compact line
    pretty = piped(daemon, "list", "--json=pretty")
    assert json.loads(pretty) == json.loads(short) and pretty.count("\n") > 10
    on_tty = on_terminal(daemon, "status", "--json", NAME)  # a terminal: pretty, and NAME stays the name
    assert json.loads(on_tty)["name"] == NAME and on_tty.count(b"\n") > 10
    assert "NAME" in piped(daemon, "list", "--json=off")


def test_no_legend_and_registration_column(daemon: Daemon, vm: dict[str, object]) -> None:
    table = piped(daemon, "list").splitlines()
    assert table[0].split() == ["NAME", "STATE", "PID", "ID", "REGISTERED", "REASON"]
    assert table[-1] == "1 machine listed."
    row = piped(daemon, "list", "--no-legend").splitlines()
    assert len(row) == 1 and row[0].split()[0] == NAME
    # No machined for this private daemon: not registered.
    assert row[0].split()[4] == "no"


def test_colour_only_on_a_terminal_and_never_with_no_color(daemon: Daemon, vm: dict[str, object]) -> None:
    assert ANSI.search(on_terminal(daemon, "list"))
    assert not ANSI.search(on_terminal(daemon, "list", NO_COLOR="1"))
    assert not ANSI.search(on_terminal(daemon, "list", SYSTEMD_COLORS="0"))
    assert not ANSI.search(on_terminal(daemon, "status", NAME, NO_COLOR=""))
    assert "\033" not in piped(daemon, "list")


def test_paused_in_list_and_status(daemon: Daemon, vm: dict[str, object]) -> None:
    daemon.call("Pause", {"name": NAME})
    try:
        assert piped(daemon, "list", "--no-legend").split()[1] == "paused"
        assert re.search(r"^\s+State: paused$", piped(daemon, "status", NAME), re.M)
    finally:
        daemon.call("Resume", {"name": NAME})
    assert piped(daemon, "list", "--no-legend").split()[1] in ("running", "ready")


def test_status_names_unit_registration_and_readiness(daemon: Daemon, vm: dict[str, object]) -> None:
    machine = daemon.call("Describe", {"name": NAME})["machine"]
    assert isinstance(machine, dict)
    fields = dict(line.strip().split(": ", 1) for line in piped(daemon, "status", NAME).splitlines()[1:] if ": " in line)
    assert fields["Unit"] == (machine["unit"] or "-")
    assert fields["Registered"] == "no"
    assert fields["Readiness"].startswith(str(machine["readiness"])) and machine["readiness"]
    assert fields["Control"].startswith(str(machine["controlAddress"]))


def test_log_pages_on_a_terminal_only(daemon: Daemon, vm: dict[str, object]) -> None:
    pager = "sed -e s/^/paged:/"
    paged = on_terminal(daemon, "log", NAME, SYSTEMD_PAGER=pager).decode(errors="replace")
    assert "paged:VMSPAWND-TEST: acpid-running" in paged
    unpaged = on_terminal(daemon, "log", NAME, "--no-pager", SYSTEMD_PAGER=pager).decode(errors="replace")
    assert "VMSPAWND-TEST: acpid-running" in unpaged and "paged:" not in unpaged
    assert "paged:" not in piped(daemon, "log", NAME, SYSTEMD_PAGER=pager)
    assert "paged:" not in on_terminal(daemon, "log", NAME, SYSTEMD_PAGER="cat").decode(errors="replace")


# --- Tab completion --------------------------------------------------------------------------

BASH_DRIVER = r"""
source "$1"; shift
fn=$(complete -p vmspawnctl | sed -E 's/.* -F ([^ ]+) .*/\1/')
COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$fn" vmspawnctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""

# zsh completes only inside its line editor: an interactive zsh on a pty gets the words and
# Tab typed, and a compadd wrapper prints what would be offered (the technique of zsh's own
# Test/comptest, with the test as the terminal so that every process is reaped).
ZSH_INIT = r"""
PROMPT=
fpath=("$COMPDIR" $fpath)
autoload -Uz compinit && compinit -u -D
bindkey '^I' complete-word
zstyle ':completion:*' list-grouped false
_capture_end() { print -r -- '<<END>>' }
comppostfuncs=( _capture_end )
compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return $?; fi
  local -a __hits
  builtin compadd -A __hits "$@"
  (( $#__hits )) && print -rl -- "<<HIT>>"${^__hits}"<<"
  return 0
}
print -r -- '<<READY>>'
"""


def read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    """Read a pty until `marker` shows (or, for b"", until every writer closed it)."""
    output = b""
    deadline = time.monotonic() + timeout
    while not marker or marker not in output:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout} s; got {output[-2000:]!r}")
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other side is gone
            data = b""
        if not data:
            if marker:
                raise AssertionError(f"pty closed before {marker!r}; got {output[-2000:]!r}")
            break
        output += data
    return output


@pytest.fixture(scope="module")
def completion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("completion")
    for shell, name in (("bash", "vmspawnctl.bash"), ("zsh", "_vmspawnctl")):
        script = subprocess.run(
            [sys.executable, "-m", "vmspawnctl.completion", shell], capture_output=True, text=True, check=True
        ).stdout
        (directory / name).write_text(script)
    (directory / "driver.bash").write_text(BASH_DRIVER)
    (directory / "init.zsh").write_text(ZSH_INIT)
    return directory


def bash_complete(completion: Path, env: dict[str, str], *words: str) -> list[str]:
    """What bash offers for the last of `words` (as bash splits a line: '=' is a word of its own)."""
    result = subprocess.run(
        ["bash", "--norc", str(completion / "driver.bash"), str(completion / "vmspawnctl.bash"), "vmspawnctl", *words],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def zsh_complete(completion: Path, env: dict[str, str], line: str) -> list[str]:
    """What zsh offers when Tab is pressed after `line`."""
    if not shutil.which("zsh"):
        pytest.fail("zsh is not installed: scripts/test installs it (VMSPAWND_TEST_PACKAGES)")
    master, slave = pty.openpty()
    shell = subprocess.Popen(
        ["zsh", "-f", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        env=env | {"COMPDIR": str(completion)},
    )
    os.close(slave)
    try:
        os.write(master, f"source {completion / 'init.zsh'}\n".encode())
        read_until(master, b"<<READY>>")
        os.write(master, line.encode() + b"\t")
        offered = read_until(master, b"<<END>>").decode(errors="replace")
        os.write(master, b"\x15exit\n")  # Ctrl-U empties the line
        read_until(master, b"")
        assert shell.wait(timeout=30) == 0
    finally:
        os.close(master)
        if shell.poll() is None:
            shell.kill()
            shell.wait()
    return re.findall(r"<<HIT>>(.*?)<<", offered)


def test_bash_completes_verbs_values_and_machine_names(daemon: Daemon, vm: dict[str, object], completion: Path) -> None:
    env = ctl_env(daemon)
    assert bash_complete(completion, env, "st") == ["start", "status", "stop"]
    assert bash_complete(completion, env, "start", "--cons") == ["--console"]
    assert bash_complete(completion, env, "start", "--console", "=", "") == ["interactive", "read-only", "native", "gui"]
    assert bash_complete(completion, env, "start", "--kvm", "=", "a") == ["auto"]
    assert "list" in bash_complete(completion, env, "start", "--firmware", "=", "l")
    assert bash_complete(completion, env, "status", "") == [NAME]
    assert bash_complete(completion, env, "console", "--read-only", "co") == [NAME]
    # The machine names come from the daemon the command line names.
    elsewhere = env | {"VMSPAWN_ADDRESS": "/nonexistent"}
    assert bash_complete(completion, elsewhere, "status", "") == []
    assert bash_complete(completion, elsewhere, "--address", "=", daemon.address, "stop", "") == [NAME]


def test_zsh_completes_verbs_values_and_machine_names(daemon: Daemon, vm: dict[str, object], completion: Path) -> None:
    env = ctl_env(daemon)
    assert zsh_complete(completion, env, "vmspawnctl st") == ["start", "status", "stop"]
    assert zsh_complete(completion, env, "vmspawnctl start --ssh-key-type=") == [
        "ed25519",
        "rsa",
        "ecdsa",
        "ecdsa-sk",
        "ed25519-sk",
    ]
    assert zsh_complete(completion, env, "vmspawnctl start --notify-ready ") == ["yes", "no"]
    assert zsh_complete(completion, env, "vmspawnctl status ") == [NAME]
    assert zsh_complete(completion, env | {"VMSPAWN_ADDRESS": "/nonexistent"}, f"vmspawnctl --address={daemon.address} log ") == [
        NAME
    ]


def test_completing_a_machine_name_is_fast(daemon: Daemon, vm: dict[str, object], completion: Path) -> None:
    """Tab must not feel slow: one `vmspawnctl list --no-legend` round trip."""
    env = ctl_env(daemon)
    bash_complete(completion, env, "status", "")  # warm caches
    started = time.monotonic()
    for _ in range(5):
        assert bash_complete(completion, env, "status", "") == [NAME]
    per_tab = (time.monotonic() - started) / 5
    assert per_tab < 1.0, f"{per_tab:.2f} s per Tab"
