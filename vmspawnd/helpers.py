# SPDX-License-Identifier: LGPL-2.1-or-later
"""Helper processes of a VM (swtpm, virtiofsd, journal-remote) and SSH keys.

`start_helpers` runs before QEMU is built: it starts what the spec needs, each on a socket
the daemon created, registers their teardown on the VM's exit stack (reverse order of
start), and returns what the QEMU command needs from them. The machine supervises the
returned processes: if one dies while the VM runs, the VM ends with a reason naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from .process import ChildProcess
from .spec import VmSpec


@dataclasses.dataclass
class HelperSet:
    """What the helpers contribute: `resources` are keyword overrides for qemu_command.Resources."""

    processes: dict[str, ChildProcess] = dataclasses.field(default_factory=dict)
    resources: dict[str, object] = dataclasses.field(default_factory=dict)


async def start_helpers(
    spec: VmSpec, machine_name: str, directory: Path, stack: contextlib.AsyncExitStack
) -> HelperSet:
    """Start every helper the spec asks for; nothing yet (see the helper-processes issue)."""
    return HelperSet()
