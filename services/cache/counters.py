"""The per-tenant lookup counters in Redis (hits by layer, misses, vetoes by reason), written together.

The lookups of one embedding batch get their vectors, and so their answers, in the same turn of the
event loop; their counts go to Redis in one pipeline, one round trip for the batch instead of one per
lookup. Each lookup still waits for that write before it answers, so a `Stats` read after an answer
includes it, and a Redis failure fails every lookup of the batch, as its own write would have.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from redis.asyncio import Redis

from services.cache import keys


class CoalescedCounters:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: Counter[tuple[str, str]] = Counter()
        self._written: asyncio.Future[None] | None = None
        self._writes: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def add(self, tenant_id: str, *counters: str) -> asyncio.Future[None]:
        """Adds one to each counter of the tenant; done once the write that carries it is done."""
        if self._written is None:
            loop = asyncio.get_running_loop()
            self._written = loop.create_future()
            # Its first step runs after the callbacks already due in this turn: the batch's other lookups.
            task = loop.create_task(self._write(self._written))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        for counter in counters:
            self._pending[keys.stats_key(tenant_id), counter] += 1
        return asyncio.shield(self._written)

    async def _write(self, written: asyncio.Future[None]) -> None:
        pending, self._pending, self._written = self._pending, Counter(), None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for (key, counter), amount in pending.items():
                    pipe.hincrby(key, counter, amount)
                await pipe.execute()
        except Exception as exc:  # every lookup waiting on this write fails with the same error
            written.set_exception(exc)
            written.exception()  # retrieved, also when every lookup of the batch has gone (cancelled)
        else:
            written.set_result(None)
