"""Work that runs after the answer has gone out (usage records, cache stores, health reports).

Tasks are kept referenced until they finish (asyncio holds only weak references), and a shutdown waits
for them, so a SIGTERM never drops a usage record that was already on its way.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

from libs import deadline

log = logging.getLogger(__name__)


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        # The work outlives the request: it keeps the request id for its logs but not the request's
        # deadline, which would cut a usage record short the moment the answer went out.
        context = contextvars.copy_context()
        context.run(deadline.start, None)
        task = asyncio.get_running_loop().create_task(work, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def drain(self, within_seconds: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within_seconds)
