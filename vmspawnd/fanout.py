# SPDX-License-Identifier: LGPL-2.1-or-later
"""One publisher, many subscribers, and a publisher that never waits for any of them.

The daemon's events (Manager.subscribe) and a VM's raw QMP events (Machine.subscribe_qmp)
reach their subscribers through bounded queues. A subscriber that does not keep up must not
slow the VMs or the other subscribers, so `publish` never blocks: what does not fit is
handled by the fan-out's overflow policy (drop it, or tell the subscriber it lost events).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FanOut(Generic[T]):
    """Bounded per-subscriber queues; `overflow(item)` is what a full queue gets instead
    (after it is emptied), or nothing when `overflow` is None (the item is dropped)."""

    def __init__(self, maxsize: int, overflow: Callable[[T], T] | None = None) -> None:
        self._maxsize = maxsize
        self._overflow = overflow
        self._queues: set[asyncio.Queue[T]] = set()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[T]]:
        """A queue that receives everything published while the block runs."""
        queue: asyncio.Queue[T] = asyncio.Queue(maxsize=self._maxsize)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    def publish(self, item: T) -> None:
        for queue in self._queues:
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                if self._overflow is None:
                    continue
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(self._overflow(item))

    def __len__(self) -> int:
        return len(self._queues)
