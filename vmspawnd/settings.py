# SPDX-License-Identifier: LGPL-2.1-or-later
"""Daemon-wide settings that each machine needs (set from vmspawnd's command line)."""

from __future__ import annotations

import dataclasses
import os

from vmspawnd.varlink.server import Peer, PeerPolicy


def owner_only(peer: Peer) -> bool:
    """System instance: root only; user instance: its owner only. Same rule: our euid."""
    return peer.uid == os.geteuid()


def session_has_display() -> bool:
    """A user instance in a graphical session: --console=gui opens a window there.

    The system instance and a user instance without DISPLAY/WAYLAND_DISPLAY in its
    environment (`systemctl --user import-environment` puts them there) serve the
    display on a socket in the VM's runtime directory instead.
    """
    return os.geteuid() != 0 and any(os.environ.get(var) for var in ("WAYLAND_DISPLAY", "DISPLAY"))


@dataclasses.dataclass(frozen=True)
class Settings:
    notify_transport: str = "vsock"  # or "unix": an AF_UNIX stand-in where vsock is missing
    peer_policy: PeerPolicy = owner_only
    gui_window: bool = dataclasses.field(default_factory=session_has_display)
