# SPDX-License-Identifier: LGPL-2.1-or-later
"""Signal names and numbers as systemd and kill(1) write them (parsers.parse_signal/signal_name)."""

from __future__ import annotations

import signal

import pytest

from vmspawnd.spec.parsers import parse_signal, signal_name


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("SIGTERM", 15),
        ("TERM", 15),
        ("term", 15),
        ("15", 15),
        (15, 15),
        ("SIGKILL", 9),
        ("SIGRTMIN+4", int(signal.SIGRTMIN) + 4),
        ("RTMIN+4", int(signal.SIGRTMIN) + 4),
        ("SIGRTMIN", int(signal.SIGRTMIN)),
        ("SIGRTMAX", int(signal.SIGRTMAX)),
        ("SIGRTMAX-2", int(signal.SIGRTMAX) - 2),
        ("SIGIOT", 6),
        ("64", 64),
    ],
)
def test_parse_signal(text: str | int, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["0", "65", -1, "SIGFOO", "RTMIN-1", "RTMAX+1", "RTMIN+31", "", "SIG", True, 1.5, None])
def test_parse_signal_refuses_with_the_accepted_forms(text: object) -> None:
    with pytest.raises(ValueError, match="SIGRTMIN\\+4"):
        parse_signal(text)  # type: ignore[arg-type]  # wrong types on purpose: Kill{signal} is JSON


def test_every_number_has_a_name_that_parses_back() -> None:
    for number in range(1, int(signal.SIGRTMAX) + 1):
        name = signal_name(number)
        if number in (32, 33):  # glibc's own realtime signals: no name, and not parseable by name
            assert name == f"signal {number}"
            continue
        assert parse_signal(name) == number
    assert signal_name(int(signal.SIGRTMIN) + 4) == "SIGRTMIN+4"
    assert signal_name(0) == "signal 0" and signal_name(99) == "signal 99"
