# SPDX-License-Identifier: LGPL-2.1-or-later
"""One owner for an object's background tasks.

asyncio keeps only a weak reference to a task, so a task nobody holds can vanish mid-run,
and a task nobody awaits hides its exception. Every long-lived object of the daemon (a
Manager, a Machine, a QMP session's helpers) therefore starts its background work through
one `TaskOwner`: the owner keeps each task until it ends, logs a failure nobody else will
see, and `aclose()` cancels and awaits whatever is still running.

Not an `asyncio.TaskGroup`: a group is a scope (`async with`) whose first failing task
cancels all the others. These tasks live as long as their owner object, not a block, and a
VM's escalation task failing must not cancel its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

_log = logging.getLogger(__name__)

T = TypeVar("T")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("%s failed", task.get_name(), exc_info=task.exception())


class TaskOwner:
    """The background tasks of one object: started here, held here, ended here."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, T], name: str, *, report: bool = True) -> asyncio.Task[T]:
        """Run `coroutine` in the background; the task is held until it ends.

        With `report`, a failure is logged here (nobody awaits the task); without, the
        caller handles the task's outcome itself.
        """
        task = asyncio.get_running_loop().create_task(coroutine, name=f"{self._owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if report:
            task.add_done_callback(_log_failure)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Wait until every task started so far has ended (they are not cancelled)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))  # exceptions stay with the tasks' owners

    async def aclose(self) -> None:
        """Cancel every task still running and wait for all of them to end."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
