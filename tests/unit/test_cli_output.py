# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnctl's systemd-style output, without a daemon: --json modes, --no-legend, colour
rules (SYSTEMD_COLORS, NO_COLOR, TERM=dumb, terminal or not) and the pager choice, on
Machine records shaped like the daemon's. A real pseudo-terminal stands for the user's
terminal. tests/integration/test_cli_output.py drives the same through a real daemon."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from typing import IO

import pytest
from vmspawnctl import output
from vmspawnctl.main import build_parser
from vmspawnctl.run import default_tint_if_wanted
from vmspawnctl.views import machine_status, machine_table

ANSI = re.compile(r"\033\[[0-9;]*m")


def record(name: str, state: str = "ready", **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": name,
        "id": "0123abcd",
        "uid": 0,
        "state": state,
        "paused": False,
        "ready": state == "ready",
        "qemu": {"pid": 4242, "startTime": 1, "bootId": "b"},
        "reaper": {"pid": 4241, "startTime": 1, "bootId": "b"},
        "reason": "",
        "registered": False,
        "unit": "",
        "readiness": "",
        "controlAddress": "",
        "qmpAddress": "/run/x/qmp",
        "consoleAddress": "/run/x/console",
        "consoleLog": "/run/x/console.log",
    }
    return base | extra


@pytest.fixture
def terminal() -> Iterator[IO[str]]:
    """The slave side of a real pseudo-terminal, as a text stream."""
    master, slave = os.openpty()
    with open(slave, "w") as stream:
        yield stream
    os.close(master)


def test_bare_json_is_pretty_on_a_terminal_and_short_elsewhere() -> None:
    assert output.expand_bare_json(["list", "--json"], on_terminal=True) == ["list", "--json=pretty"]
    assert output.expand_bare_json(["list", "--json"], on_terminal=False) == ["list", "--json=short"]
    assert output.expand_bare_json(["list", "--json=off"], on_terminal=True) == ["list", "--json=off"]
    assert output.expand_bare_json(["events", "--", "--json"], on_terminal=True) == ["events", "--", "--json"]


def test_bare_json_does_not_swallow_the_machine_name() -> None:
    """`status --json demo`: getopt takes an optional value only after '='."""
    argv = output.expand_bare_json(["status", "--json", "demo"], on_terminal=False)
    args = build_parser(argv).parse_args(argv)
    assert (args.name, args.json) == ("demo", "short")


def test_json_modes_and_a_bad_mode(capsys: pytest.CaptureFixture[str]) -> None:
    value = [{"name": "a", "n": [1, 2]}]
    assert output.dumps(value, "short") == '[{"name":"a","n":[1,2]}]'
    assert json.loads(output.dumps(value, "pretty")) == value
    assert output.dumps(value, "pretty").count("\n") > 3
    with pytest.raises(SystemExit) as exc:
        build_parser(["list"]).parse_args(["list", "--json=yaml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert err == "vmspawnctl list: argument --json: invalid mode 'yaml'; expected one of pretty, short, off (or --json alone)"


def test_list_shows_paused_and_registration_and_the_legend() -> None:
    machines = [
        record("web", registered=True, unit="web.scope"),
        record("db", paused=True),
        record("old", state="stopped", reason="powered off"),
    ]
    lines = machine_table(machines)
    assert lines[0].split() == ["NAME", "STATE", "PID", "ID", "REGISTERED", "REASON"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert rows["web"][1:5] == ["ready", "4242", "0123abcd", "yes"]
    assert rows["db"][1] == "paused" and rows["db"][4] == "no"
    assert rows["old"][1:3] == ["stopped", "-"] and lines[3].endswith("powered off")
    assert lines[-2:] == ["", "3 machines listed."]


def test_no_legend_prints_only_the_rows() -> None:
    lines = machine_table([record("web"), record("db")], legend=False)
    assert [line.split()[0] for line in lines] == ["web", "db"]
    assert machine_table([], legend=False) == []
    assert machine_table([])[-1] == "0 machines listed."


def test_colour_only_when_asked_and_columns_stay_aligned() -> None:
    machines = [record("web"), record("broken", state="failed", reason="QEMU exited with status 1")]
    plain, coloured = machine_table(machines), machine_table(machines, colour=True)
    assert not any(ANSI.search(line) for line in plain)
    assert "\033[1m" in coloured[0] and "\033[31m" in coloured[2] and "\033[32m" in coloured[1]
    assert [ANSI.sub("", line) for line in coloured] == plain


def test_status_shows_unit_registration_readiness_and_control() -> None:
    m = record(
        "web",
        registered=True,
        unit="web.scope",
        readiness="guest (READY=1 over the notify socket)",
        controlAddress="/run/vmspawnd/machines/0123abcd/control",
        statusText="Booting…",
    )
    fields = dict(line.strip().split(": ", 1) for line in machine_status(m)[1:])
    assert fields["Unit"] == "web.scope"
    assert fields["Registered"] == "yes (systemd-machined)"
    assert fields["Readiness"] == "guest (READY=1 over the notify socket); reached"
    assert fields["Control"] == "/run/vmspawnd/machines/0123abcd/control (io.systemd.MachineInstance)"
    assert fields["Status"] == '"Booting…"'
    assert fields["State"] == "ready"
    starting = dict(
        line.strip().split(": ", 1)
        for line in machine_status(
            record("s", state="running", readiness="running (no vsock: the guest cannot report readiness)")
        )[1:]
    )
    assert starting["Readiness"].endswith("; not yet") and starting["Registered"] == "no" and starting["Unit"] == "-"
    paused = machine_status(record("p", paused=True))
    assert "State: paused" in "\n".join(paused)
    # Labels are right-aligned on the colon, as in systemctl status.
    assert len({line.index(":") for line in machine_status(m)[1:]}) == 1


def test_colour_rules_follow_systemd(terminal: IO[str]) -> None:
    pipe = io.StringIO()
    assert output.colour_enabled(terminal, {"TERM": "xterm"})
    assert not output.colour_enabled(pipe, {"TERM": "xterm"})
    assert not output.colour_enabled(terminal, {"TERM": "xterm", "NO_COLOR": ""})
    assert not output.colour_enabled(terminal, {"TERM": "xterm", "SYSTEMD_COLORS": "0"})
    assert not output.colour_enabled(terminal, {"TERM": "dumb"})
    # An explicit SYSTEMD_COLORS wins, as in systemd's get_color_mode(): even over NO_COLOR and a pipe.
    assert output.colour_enabled(pipe, {"SYSTEMD_COLORS": "1", "NO_COLOR": "1"})
    assert output.colour_enabled(pipe, {"SYSTEMD_COLORS": "256"})
    assert output.colour_enabled(terminal, {"TERM": "xterm", "SYSTEMD_COLORS": "nonsense"})


def test_run_tints_by_default_only_with_colour(terminal: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", terminal)
    assert default_tint_if_wanted({"TERM": "xterm"}).startswith("48;2;")
    assert default_tint_if_wanted({"TERM": "xterm", "NO_COLOR": "1"}) == ""
    assert default_tint_if_wanted({"TERM": "xterm", "SYSTEMD_COLORS": "no"}) == ""
    assert default_tint_if_wanted({"TERM": "xterm", "SYSTEMD_TINT_BACKGROUND": "0"}) == ""


def test_pager_choice() -> None:
    path = {"PATH": os.defpath}
    assert output.pager_command({**path, "SYSTEMD_PAGER": "most -s", "PAGER": "more"}) == ["most", "-s"]
    assert output.pager_command({**path, "PAGER": "more"}) == ["more"]
    assert output.pager_command({**path, "SYSTEMD_PAGER": "cat", "PAGER": "more"}) is None
    assert output.pager_command({**path, "SYSTEMD_PAGER": ""}) is None
    assert output.pager_command({"PATH": "/nonexistent"}) is None


GLUED_BEFORE = [
    "--ram=12Q",
    "--ram=256MB",
    "--kvm=maybe",
    "--uuid=00",
    "--private-users=x",
    "--background=zz",
    "--vsock-cid=2",
    "--grow-image=1Q",
    "--notify-ready=2",
    "--set-credential=foo",
    "--console=foo",
    "--load-credential=id:/nonexistent/file",
]


@pytest.mark.parametrize("form", GLUED_BEFORE)
def test_an_option_error_is_one_sentence(capsys: pytest.CaptureFixture[str], form: str) -> None:
    """Each of these printed two "expected" clauses glued together; now one sentence names the
    option, what it got and the accepted forms."""
    option, _, value = form.partition("=")
    with pytest.raises(SystemExit) as exc:
        build_parser(["start"]).parse_args(["start", form])
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[0]  # then the pointer to --help
    assert re.match(rf"vmspawnctl start: argument (-\w/)?{option}\b", message), message
    assert value.split(":")[-1] in message and message.count("expected") == 1, message


def test_the_ram_message_in_full(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["start"]).parse_args(["start", "--ram=12Q"])
    assert capsys.readouterr().err.strip().splitlines()[0] == (
        "vmspawnctl start: argument --ram/--qemu-mem: invalid size '12Q': expected a non-negative number with an "
        "optional decimal fraction and an optional suffix B, K, M, G, T, P or E (upper case, powers of 1024), e.g. 2G, "
        "512M or 1.5K"
    )


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        ("remove", "cannot remove 'vm' while it is ready; stop it first"),
        (
            "snapshot (it is paused, and a paused guest cannot release its network card; resume it first)",
            "cannot snapshot 'vm' while it is ready: it is paused, and a paused guest cannot release its network card;"
            " resume it first",
        ),
        (
            "snapshot (QEMU: migrate: GenericError: x (y))",
            "cannot snapshot 'vm' while it is ready: QEMU: migrate: GenericError: x (y)",
        ),
    ],
)
def test_invalid_state_reads_as_a_sentence_with_the_daemons_reason(operation: str, expected: str) -> None:
    from vmspawnctl.main import format_error
    from vmspawnctl.varlink import VarlinkError

    error = VarlinkError("io.vmspawnd.Manager.InvalidState", {"name": "vm", "state": "ready", "operation": operation})
    assert format_error(error).startswith(expected)
