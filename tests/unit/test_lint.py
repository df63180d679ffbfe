# SPDX-License-Identifier: LGPL-2.1-or-later
"""ruff and mypy run as tests over the daemon, the CLI, the tests and the benchmarks, when they are
installed. The rule sets live in pyproject.toml: ruff's E, W, F, I, UP, B; mypy strict with
explicit-override (every override says `@override`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ["vmspawnd", "clients", "tests", "bench"]


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    result = subprocess.run([ruff, "check", *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    """Types hold under `mypy --strict` on the daemon, the CLI, the tests and the benchmarks (JSON
    shapes are Any where the IDL, not Python, describes them)."""
    mypy = shutil.which("mypy") or str(Path(sys.executable).with_name("mypy"))
    if not Path(mypy).exists():
        pytest.skip("mypy is not installed")
    result = subprocess.run([mypy, *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
