# SPDX-License-Identifier: LGPL-2.1-or-later
"""Where --console=gui puts the display: a window only for a user instance in a session."""

from __future__ import annotations

import os

import pytest

from vmspawnd import settings
from vmspawnd.host.peer import owner_only
from vmspawnd.varlink.machine_instance import machine_instance_servers


@pytest.mark.parametrize(
    ("euid", "env", "window"),
    [
        (0, {"DISPLAY": ":0"}, False),  # the system instance never opens windows
        (1000, {}, False),  # a headless user instance: the VNC socket
        (1000, {"DISPLAY": ""}, False),
        (1000, {"DISPLAY": ":0"}, True),
        (1000, {"WAYLAND_DISPLAY": "wayland-0"}, True),
    ],
)
def test_gui_window_only_in_a_graphical_user_session(
    monkeypatch: pytest.MonkeyPatch, euid: int, env: dict[str, str], window: bool
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    for var in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert settings.session_has_display() is window
    assert settings.Settings(serve_control=machine_instance_servers(owner_only)).gui_window is window
