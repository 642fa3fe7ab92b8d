"""The Router's own embedding of a prompt that came without the cache's is bounded in time and in
concurrency, so a Route answers within its caller's deadline (services/router/embedder.py)."""

from __future__ import annotations

import asyncio
import threading
import time

from libs import deadline
from services.router.embedder import BoundedEmbedding


class _SlowModel:
    """Stands in for PromptEmbedder: takes `seconds` per call on its thread, like MiniLM on a busy CPU."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.done = threading.Event()

    def embed_prompts(self, prompts):
        self.calls += 1
        time.sleep(self.seconds)
        self.done.set()
        return [[0.5] * 384 for _ in prompts]


def test_a_fast_embedding_is_returned():
    bounded = BoundedEmbedding(_SlowModel(0.0), timeout_seconds=1.0, max_concurrent=2)
    assert asyncio.run(bounded("hello")) == [0.5] * 384


def test_a_slow_embedding_is_given_up_in_time_and_still_counted_until_its_thread_ends():
    model = _SlowModel(0.6)
    bounded = BoundedEmbedding(model, timeout_seconds=0.1, max_concurrent=1)

    async def scenario():
        started = time.monotonic()
        first = await bounded("slow")
        waited = time.monotonic() - started
        # Its thread still runs: a second prompt is not embedded at all (no pile-up of threads).
        second_started = time.monotonic()
        second = await bounded("next")
        second_waited = time.monotonic() - second_started
        await asyncio.to_thread(model.done.wait, 5)
        await asyncio.sleep(0.05)
        third = await bounded("after")
        return first, waited, second, second_waited, third

    first, waited, second, second_waited, third = asyncio.run(scenario())
    assert first is None and waited < 0.4
    assert second is None and second_waited < 0.05
    assert third is None and model.calls == 2  # the third was started (and given up after 0.1 s)


def test_the_callers_deadline_bounds_it_too():
    model = _SlowModel(0.0)
    bounded = BoundedEmbedding(model, timeout_seconds=1.0, max_concurrent=2)

    async def scenario():
        token = deadline.start(0.01)  # less than the margin left for the rest of the Route
        try:
            return await bounded("late")
        finally:
            deadline.reset(token)

    assert asyncio.run(scenario()) is None and model.calls == 0
