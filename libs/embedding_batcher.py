"""Embedding micro-batcher: concurrent requests for embeddings are run as one model call.

A transformer on a CPU (or a GPU) embeds 32 short texts in little more than the time of a few, so
lookups that arrive together should share a forward pass. The batcher never delays a lone request:
when a worker is idle, the first text goes at once. While the workers are busy, new texts queue; when
one finishes, up to `max_batch` of them go together. Under steady load it may also hold a batch open for
`max_wait_seconds` (a few milliseconds, never more than 0.1 s) to fill it, but only while a batch runs
or ran within the last wait, i.e. when more texts are known to be coming.

The model runs in worker threads (`workers`, each batch on one), so the event loop keeps serving while
it computes; with two workers two batches run at once on two cores, each with one torch thread, which
on a busy machine beats one batch spread over two threads (OpenMP's threads wait on each other).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MAX_WAIT_CEILING_SECONDS = 0.1

EmbedFunction = Callable[[list[str]], np.ndarray]
BatchObserver = Callable[[int], None]


class EmbeddingBatcher:
    def __init__(
        self,
        embed: EmbedFunction,
        *,
        max_batch: int = 32,
        max_wait_seconds: float = 0.002,
        workers: int = 1,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 0 <= max_wait_seconds <= MAX_WAIT_CEILING_SECONDS:
            raise ValueError(f"max_wait_seconds must be within 0..{MAX_WAIT_CEILING_SECONDS}")
        self._embed = embed
        self._max_batch = max_batch
        self._max_wait = max_wait_seconds
        self._on_batch = on_batch
        self._queue: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._workers = workers
        self._in_flight = 0
        self._computing: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed")
        self._last_batch_at = float("-inf")

    async def embed(self, text: str) -> np.ndarray:
        """The text's vector (float32), computed in a batch with whatever else is waiting."""
        return (await self.embed_many([text]))[0]

    async def embed_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="embedding-batcher")
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.append((text, future))
            futures.append(future)
        self._wakeup.set()
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for task in list(self._computing):
            task.cancel()
        for _, future in self._queue:
            if not future.done():
                future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and self._in_flight < self._workers:
                busy = self._in_flight > 0 or time.monotonic() - self._last_batch_at < self._max_wait
                if busy and len(self._queue) < self._max_batch and self._max_wait > 0:
                    await self._fill(self._max_wait)
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                batch = [(text, future) for text, future in batch if not future.cancelled()]
                if not batch:
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                self._in_flight += 1
                task = asyncio.get_running_loop().create_task(self._compute(batch))
                self._computing.add(task)
                task.add_done_callback(self._computing.discard)

    async def _compute(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            vectors = await loop.run_in_executor(self._executor, self._embed, [text for text, _ in batch])
        except Exception as exc:  # every waiter learns of the failure; the batcher keeps running
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), vector in zip(batch, vectors, strict=True):
                if not future.done():
                    future.set_result(vector)
        finally:
            self._in_flight -= 1
            self._last_batch_at = time.monotonic()
            self._wakeup.set()

    async def _fill(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while len(self._queue) < self._max_batch and (left := deadline - time.monotonic()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                break
