# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnctl's errors name the real mistake: the mistake in, the message out, exit status 2,
and nothing sent to a daemon (the address points nowhere: reaching for it would exit 1).

The same mistakes against a running daemon, which must keep serving, are in
tests/integration/test_first_hour.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vmspawnctl.main import main
from vmspawnctl.start_spec import looks_like_machine_name, parse_start, spec_from_args

NOWHERE = "/nonexistent/vmspawnd.socket"


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("SYSTEMD_VMSPAWN_QEMU_EXTRA", "SYSTEMD_VMSPAWN_NETWORK_MAC", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "i").write_bytes(b"initrd")
    return tmp_path


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """Run vmspawnctl; it must fail with status 2 before contacting any daemon. Returns stderr's lines."""
    with pytest.raises(SystemExit) as info:
        main(["--address", NOWHERE, *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "cannot connect" not in err, err
    return err.splitlines()


def test_a_usage_error_is_one_line_and_a_pointer_to_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Not argparse's 25-line usage block before the one line that matters."""
    lines = usage_error(capsys, "start", "--ram=256MB")
    assert len(lines) == 2, lines
    assert lines[0].startswith("vmspawnctl start: argument --ram/--qemu-mem: ") and "'256MB'" in lines[0], lines
    assert lines[1] == "See 'vmspawnctl start --help'."
    assert not any(line.startswith("usage:") for line in lines)


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["start", "--memory=1G"], "unknown option --memory (did you mean --ram?)"),  # virt-install's name
        (["start", "--kernel", "k"], "unknown option --kernel (did you mean --linux?)"),  # QEMU's
        (["start", "--name=x"], "unknown option --name (did you mean --machine?)"),
        (["start", "--netwrok-tap"], "unknown option --netwrok-tap (did you mean --network-tap?)"),  # a typo
        (["list", "--jsn"], "unknown option --jsn (did you mean --json?)"),
        (["stop", "x", "--dedline=3"], "unknown option --dedline (did you mean --deadline?)"),
        (["rm", "x"], "unknown command 'rm' (did you mean remove?)"),
        (["destroy", "x"], "unknown command 'destroy' (did you mean terminate?)"),
        (["stauts", "x"], "unknown command 'stauts' (did you mean status?)"),
    ],
)
def test_an_unknown_option_or_command_gets_the_closest_known_one(
    capsys: pytest.CaptureFixture[str], argv: list[str], hint: str
) -> None:
    lines = usage_error(capsys, *argv)
    assert hint in lines[0], lines
    assert lines[1].startswith("See 'vmspawnctl")


def test_no_suggestion_when_nothing_is_close(capsys: pytest.CaptureFixture[str]) -> None:
    lines = usage_error(capsys, "start", "--zzzzzz")
    assert lines[0] == "vmspawnctl start: unknown option --zzzzzz", lines


def test_kernel_arguments_given_as_an_option_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    lines = usage_error(capsys, "start", "--append=quiet")
    assert "kernel command line words go after the options" in lines[0], lines


def test_a_machine_name_given_positionally(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vmspawn's getopt('+') ends the options at `dwpos`: --kvm and --linux would have become
    kernel arguments and the current directory the root; the message says so."""
    lines = usage_error(capsys, "start", "dwpos", "--kvm=no", "--linux=k")
    assert lines[0].startswith("vmspawnctl start: 'dwpos' looks like a machine name: use -M dwpos."), lines
    assert "(here also: --kvm=no --linux=k)" in lines[0]
    lines = usage_error(capsys, "run", "dwpos")
    assert "use -M dwpos" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["-D", ".", "--linux=k", "quiet"],  # an image/kernel option first: the word is the kernel's
        ["-M", "vm", "--linux=k", "single"],
        ["-D", ".", "--linux=k", "dwpos"],
    ],
)
def test_kernel_arguments_after_the_boot_options_are_kept(work: Path, argv: list[str]) -> None:
    assert spec_from_args(parse_start(argv), env={}).kernel_cmdline[-1] == argv[-1]


@pytest.mark.parametrize(
    ("word", "name"),
    [
        ("dwpos", True),
        ("my-vm", True),
        ("root=/dev/vda", False),
        ("rd.break", False),
        ("3", False),
        ("systemd.unit=rescue.target", False),
        ("/init", False),
        ("-x", False),
    ],
)
def test_what_looks_like_a_machine_name(word: str, name: bool) -> None:
    assert looks_like_machine_name(word) is name


def test_initrd_needs_linux_before_any_discovery(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without -i/-D the current directory would be searched for a kernel first, and that
    search's "Failed to locate UKI" would be the message."""
    lines = usage_error(capsys, "start", "--initrd=i")
    assert lines == ["vmspawnctl start: --initrd needs --linux", "See 'vmspawnctl start --help'."]


def test_the_current_directory_default_is_announced(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No -i/-D/-M/--linux: -D . is booted, and that is said before its kernel search fails."""
    with pytest.raises(SystemExit) as info:
        main(["--address", NOWHERE, "start"])
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2
    assert err[0] == f"vmspawnctl: no -i/-D given: booting the current directory as -D . ({work})", err
    assert "Failed to locate UKI" in err[1], err


def test_the_notice_is_a_status_message_that_quiet_silences(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--address", NOWHERE, "start", "-q"])
    err = capsys.readouterr().err
    assert "no -i/-D given" not in err and "Failed to locate UKI" in err, err


def test_cpus_zero_is_refused_as_qemu_would(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = usage_error(capsys, "start", "-M", "vm", "--linux=k", "--cpus=0")
    assert "argument --cpus/--qemu-smp: invalid value '0': cpus must be at least 1" in lines[0], lines


class _PowerOffReply:
    """Stands in for the daemon's PowerOff reply (a seam test: the real call, with its
    progress line on a terminal, is in tests/integration/test_first_hour.py)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []

    def call(self, method: str, params: dict[str, object]) -> dict[str, object]:
        self.calls.append((method, params))
        return {"machine": {"name": params["name"], "state": "stopped", "reason": "powered off on request"}}


def test_stop_shows_no_progress_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Scripts and logs get the outcome line only, never carriage-return animations."""
    from vmspawnctl.main import stop_with_progress

    reply = _PowerOffReply()
    machine = stop_with_progress(reply, "vm", 5.0)  # type: ignore[arg-type]
    assert machine["state"] == "stopped"
    assert reply.calls == [("io.vmspawnd.Manager.PowerOff", {"name": "vm", "deadline": 5.0})]
    assert capsys.readouterr().err == ""
