# SPDX-License-Identifier: LGPL-2.1-or-later
"""The seam between a VM and its per-VM control socket (io.systemd.MachineInstance).

`Machine` serves the socket while the VM runs but does not know how: the daemon hands it a
`ServeControl` (vmspawnd/varlink/machine_instance.py provides the real one) through
`Settings`, and the interface talks back to the VM only through `ControlledMachine`. So the
domain object imports no Varlink, and neither side imports the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

# A raw QMP event of the VM: (name, data); (None, None) marks the end of the VM.
QmpEvent = tuple[str | None, dict[str, object] | None]
# How a QMP exchange waits for QEMU's events: a queue of them while the block runs.
SubscribeQmp = Callable[[], contextlib.AbstractContextManager[asyncio.Queue[QmpEvent]]]


async def next_event(
    queue: asyncio.Queue[QmpEvent], name: str, matches: Callable[[dict[str, object]], bool]
) -> dict[str, object] | None:
    """The data of the first event `name` on `queue` whose data `matches`; None when the
    VM ends first (the caller bounds the wait)."""
    while True:
        event, data = await queue.get()
        if event is None:
            return None
        if event == name and data is not None and matches(data):
            return data


class ControlledMachine(Protocol):
    """What the control interface may ask of a VM (vmspawnd.machine.Machine provides it)."""

    async def qmp_execute(self, command: str) -> object:
        """One bounded QMP command; NotConnected when QEMU cannot be reached."""
        ...

    async def terminate(self) -> None: ...

    async def request_power_off(self) -> None:
        """The ACPI power button, escalating after the default deadline; returns once pressed."""
        ...

    async def reboot(self) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    def subscribe_qmp(self) -> contextlib.AbstractContextManager[asyncio.Queue[QmpEvent]]: ...


class ControlServer(Protocol):
    """A VM's control socket while it is served."""

    def close(self, drain_timeout: float) -> None:
        """Stop accepting now, close idle connections, answer the calls in flight and then
        close theirs; cut off whatever is still busy after `drain_timeout` seconds.

        Returns at once and the drain goes on by itself: a call in flight (Terminate) may
        be waiting for the very teardown that closes the server.
        """
        ...


# Serve the control interface of `machine` on a new socket at `path` (mode 0600).
ServeControl = Callable[[ControlledMachine, Path], Awaitable[ControlServer]]
