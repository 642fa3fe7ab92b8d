"""Runs blocking torch generations on worker threads and hands their events to asyncio callers.

At most `max_running` generations run at once (torch shares the cores; more would only slow each one
down) and at most `max_waiting` wait for a slot; beyond that a request is shed at once with
`Overloaded` instead of queueing without bound. When the consumer goes away (client cancelled, deadline)
the generation's `cancelled` event is set, so the worker thread stops within a token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from libs.errors import Unavailable

T = TypeVar("T")
_DONE = object()


class Overloaded(Unavailable):
    pass


class GenerationScheduler:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="generate")
        self._capacity = max_running + max_waiting
        self._admitted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def _admit(self) -> None:
        if self._admitted >= self._capacity:
            raise Overloaded(f"inference is at capacity ({self._capacity} generations running or waiting)")
        self._admitted += 1

    async def stream(self, produce: Callable[[threading.Event], Iterator[T]]) -> AsyncIterator[T]:
        """Yields what `produce(cancelled)` yields on a worker thread, as it yields it."""
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def work() -> None:
            try:
                if cancelled.is_set():
                    return
                for item in produce(cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = loop.run_in_executor(self._executor, work)
        worker.add_done_callback(lambda _: self._release())
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            cancelled.set()

    async def run(self, compute: Callable[[], T]) -> T:
        """Runs one blocking call (e.g. an embedding batch) under the same admission limits."""
        self._admit()
        future = asyncio.get_running_loop().run_in_executor(self._executor, compute)
        future.add_done_callback(lambda _: self._release())
        return await future

    def _release(self) -> None:
        self._admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
