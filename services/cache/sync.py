"""Keeps this replica's semantic index in step with Redis, where every replica writes.

At start-up the index is rebuilt from a SCAN of the entries (noting the event stream's position first,
so nothing written during the scan is missed); afterwards the replica follows the event stream (XREAD,
blocking) and applies every put and deletion, its own included (applying twice is harmless). An entry
that expires is dropped by a periodic sweep. A Store on one replica is thus searchable on the others
within one stream round trip (milliseconds), far inside the second the design allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from services.cache import keys
from services.cache.entries import EntryStore, StoredEntry

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.5
READ_COUNT = 500
SWEEP_SECONDS = 1.0

Apply = Callable[[StoredEntry], None]
Forget = Callable[[list[str]], None]


class IndexSync:
    def __init__(
        self,
        redis: Redis,
        entries: EntryStore,
        apply: Apply,
        forget: Forget,
        sweep: Callable[[], None],
        block_ms: int,
    ) -> None:
        self._redis = redis
        self._entries = entries
        self._apply = apply
        self._forget = forget
        self._sweep = sweep
        self._block_ms = block_ms
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    async def rebuild(self) -> tuple[str, int]:
        """Loads every entry with a vector into the index; returns the stream position to follow from."""
        position = await self._entries.last_event_id()
        loaded = 0
        async for batch in self._entries.scan_keys():
            for entry in await self._entries.read_many(batch):
                self._apply(entry)
                loaded += 1
        return position, loaded

    def follow(self, position: str) -> None:
        self._tasks = [
            asyncio.create_task(self._follow(position), name="cache-index-sync"),
            asyncio.create_task(self._sweep_periodically(), name="cache-index-sweep"),
        ]

    async def close(self) -> None:
        # redis-py can turn a cancellation that lands inside a blocking XREAD into its own connection
        # error, which the loop below retries on: the tasks are cancelled until they have ended, and the
        # loop stops at the flag (a shutdown hung here until the process was killed).
        self._closing = True
        tasks, running = self._tasks, self._tasks
        while running:
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=0.1)
            running = [task for task in running if not task.done()]
        await asyncio.gather(*tasks, return_exceptions=True)  # all ended: their outcomes collected
        self._tasks = []

    async def _follow(self, position: str) -> None:
        failing = False
        while not self._closing:
            try:
                replies = await self._redis.xread(
                    {keys.EVENTS: position}, count=READ_COUNT, block=self._block_ms
                )
                for _stream, events in replies or []:
                    for event_id, fields in events:
                        await self._on_event(fields)
                        position = event_id.decode() if isinstance(event_id, bytes) else event_id
                if failing:
                    log.info("following cache events again")
                    failing = False
            except (redis_errors.RedisError, OSError) as exc:
                if not failing:
                    log.warning("cannot follow cache events (%s); retrying", exc)
                    failing = True
                await asyncio.sleep(RETRY_SECONDS)

    async def _on_event(self, fields: dict) -> None:
        operation = fields.get(b"op")
        if operation == b"put":
            key = fields[b"key"].decode()
            entry = await self._entries.read(key)
            if entry is not None:
                self._apply(entry)
        elif operation == b"del":
            self._forget(fields[b"keys"].decode().split())

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self._sweep()
