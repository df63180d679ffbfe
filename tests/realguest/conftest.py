# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fixtures of the real-guest tests: the guest built once per session (cached across runs by
its recipe's hash, see image.py), and the times every run reports at its end.

    real_guest   session-scoped: the built RealGuest (minutes the first time, then cached)

Building needs root (debootstrap, chroots); without root the module is skipped with that
reason. As root a failed build is a failure: CI runs as root and must run these tests.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.realguest.image import RealGuest, ensure_real_guest

# (what, seconds), for the summary at the end of the run: the build, each boot to `running`.
TIMINGS: list[tuple[str, float]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("real guest times")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:7.1f}s  {what}")


@pytest.fixture(scope="session")
def real_guest() -> RealGuest:
    if os.geteuid() != 0:
        pytest.skip("building the real guest needs root (debootstrap, chroots)")
    started = time.monotonic()
    guest = ensure_real_guest()
    seconds = time.monotonic() - started
    TIMINGS.append((f"real guest {guest.directory.name} ({'built' if seconds > 5 else 'cached'})", seconds))
    return guest
