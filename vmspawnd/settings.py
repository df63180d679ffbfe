# SPDX-License-Identifier: LGPL-2.1-or-later
"""Daemon-wide settings that each machine needs (set from vmspawnd's command line)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vmspawnd.control import ServeControl
from vmspawnd.host.identity import IdRange


def session_has_display() -> bool:
    """A user instance in a graphical session: --console=gui opens a window there.

    The system instance and a user instance without DISPLAY/WAYLAND_DISPLAY in its
    environment (`systemctl --user import-environment` puts them there) serve the
    display on a socket in the VM's runtime directory instead.
    """
    return os.geteuid() != 0 and any(os.environ.get(var) for var in ("WAYLAND_DISPLAY", "DISPLAY"))


@dataclasses.dataclass(frozen=True)
class Settings:
    # How each VM serves its io.systemd.MachineInstance socket. Injected (the daemon passes
    # vmspawnd.varlink.machine_instance's, with its peer policy) so that machines import no
    # Varlink; no default, as a VM without one would register a control address nobody serves.
    serve_control: ServeControl = dataclasses.field(kw_only=True)
    notify_transport: str = "vsock"  # or "unix": an AF_UNIX stand-in where vsock is missing
    gui_window: bool = dataclasses.field(default_factory=session_has_display)
    # The system instance confines every VM: QEMU and swtpm run as a uid=gid of their own
    # from this range, sandboxed (docs/security.md). None: they run as the daemon does
    # (a user instance, or `vmspawnd --qemu-user=root`).
    vm_ids: IdRange | None = None
    # Where snapshot bundles are kept (the daemon's --state-dir + /snapshots); None: under
    # the runtime directory, which outlives a daemon restart but not a reboot.
    snapshot_dir: Path | None = None
