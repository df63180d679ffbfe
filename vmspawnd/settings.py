# SPDX-License-Identifier: LGPL-2.1-or-later
"""Daemon-wide settings that each machine needs (set from vmspawnd's command line)."""

from __future__ import annotations

import dataclasses
import os

from .varlink_server import Peer, PeerPolicy


def owner_only(peer: Peer) -> bool:
    """System instance: root only; user instance: its owner only. Same rule: our euid."""
    return peer.uid == os.geteuid()


@dataclasses.dataclass(frozen=True)
class Settings:
    notify_transport: str = "vsock"  # or "unix": an AF_UNIX stand-in where vsock is missing
    peer_policy: PeerPolicy = owner_only
