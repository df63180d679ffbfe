# SPDX-License-Identifier: LGPL-2.1-or-later
"""The committed IDL in docs/interfaces/ is exactly what the daemon serves.

Regenerate with VMSPAWND_REGENERATE=1 and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import varlink.scanner  # python-varlink's IDL parser: an independent reader of our IDL

from vmspawnd.varlink.manager_api import ManagerInterface

DOCS = Path(__file__).resolve().parents[2] / "docs" / "interfaces"


def test_manager_idl_matches_committed_file() -> None:
    rendered = ManagerInterface.render_interface_description()
    path = DOCS / "io.vmspawnd.Manager.varlink"
    if os.environ.get("VMSPAWND_REGENERATE"):
        path.write_text(rendered)
    assert path.read_text() == rendered


def test_manager_idl_parses_with_an_independent_parser() -> None:
    interface = varlink.scanner.Interface(ManagerInterface.render_interface_description())
    assert interface.name == "io.vmspawnd.Manager"
    methods = set(interface.members) if hasattr(interface, "members") else set()
    for method in ("Spawn", "List", "Describe", "PowerOff", "Terminate", "Kill", "WaitReady", "Remove", "SubscribeEvents"):
        assert method in methods
