# SPDX-License-Identifier: LGPL-2.1-or-later
"""sd_notify and socket activation, stdlib only (docs/reference/libraries.md §6: sdnotify cannot pass
fds, systemd-python does not build without headers).
"""

from __future__ import annotations

import os
import socket


def notify(state: str, fds: list[int] | None = None) -> bool:
    """Send `state` to $NOTIFY_SOCKET; False when not run under a notify-aware manager."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        ancillary = []
        if fds:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(_int_array(fds)))))
        sock.sendmsg([state.encode()], ancillary)
    return True


def _int_array(values: list[int]) -> bytes:
    import array

    return array.array("i", values).tobytes()


SD_LISTEN_FDS_START = 3


def listen_fds() -> dict[str, list[socket.socket]]:
    """Adopt socket-activated fds by name and remove LISTEN_* from the environment, so
    that children (QEMU, helpers) do not believe they were activated too.
    """
    env = os.environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return {}
    result: dict[str, list[socket.socket]] = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) else "unknown"
        result.setdefault(name, []).append(socket.socket(fileno=fd))
    return result
