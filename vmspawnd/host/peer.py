# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who is calling: the credentials of a Unix socket's peer (SO_PEERCRED) and the rule that
admits a peer.

Plain types, so that the settings and the daemon can name a policy without loading the
Varlink server that applies it (vmspawnd/varlink/server.py checks every call with one).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


PeerPolicy = Callable[[Peer], bool]


def peer_credentials(sock: socket.socket) -> Peer:
    """The process at the other end of a connected AF_UNIX socket, as the kernel recorded it."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid, uid, gid)


def owner_only(peer: Peer) -> bool:
    """System instance: root only; user instance: its owner only. Same rule: our euid."""
    return peer.uid == os.geteuid()
