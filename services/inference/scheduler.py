"""The two generation schedulers, as asyncio callers see them: `stream(...)` yields a generation's events.

* `ContinuousScheduler` (the default) hands every request to the model's stepping loop (batching.py):
  all running generations advance together, one forward pass per step.
* `ThreadPerRequestScheduler` runs each generation on a worker thread of its own with its own KV cache,
  at most `max_running` at once. It is the path the continuous batcher replaced, kept (setting
  `inference.scheduler: thread_per_request`) as the baseline `make bench-inference` measures against.

Either way a request that cannot even queue is refused at once (UNAVAILABLE), and when the consumer goes
away (client cancelled, deadline) its generation stops within a step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from libs.config import GenerationSchedulerKind, InferenceConfig
from libs.errors import ServiceError
from services.inference import metrics
from services.inference.batching import BatchSettings, BatchStats, ContinuousBatcher, Overloaded, Sequence
from services.inference.engine import ChatModel
from services.inference.kv_cache import bytes_per_token
from services.inference.sampling import GenerationParams, Sampler
from services.inference.text import GenerationEvent

_DONE = object()


class GenerationScheduler(Protocol):
    def stream(
        self, prompt_token_ids: list[int], params: GenerationParams, deadline: float | None
    ) -> AsyncIterator[GenerationEvent]:
        """The generation's events; `deadline` is a time.monotonic() value (None: no deadline)."""

    def stats(self) -> BatchStats: ...

    @property
    def max_running(self) -> int:
        """Generations that may run at once."""

    @property
    def kv_token_budget(self) -> int:
        """KV-cache tokens the running generations may hold (0: not managed)."""

    def drain(self, deadline: float) -> None:
        """Shutting down: running generations end by `deadline` (time.monotonic()), nothing new starts."""

    async def close(self) -> None: ...


class ContinuousScheduler:
    def __init__(self, model: ChatModel, settings: BatchSettings) -> None:
        self._model = model
        self._loop = asyncio.get_running_loop()
        self._batcher = ContinuousBatcher(model, settings, self._publish)
        self._batcher.start()

    def stats(self) -> BatchStats:
        return self._batcher.stats()

    @property
    def max_running(self) -> int:
        return self._batcher.settings.max_batch_size

    @property
    def kv_token_budget(self) -> int:
        return self._batcher.settings.kv_token_budget

    async def stream(
        self, prompt_token_ids: list[int], params: GenerationParams, deadline: float | None
    ) -> AsyncIterator[GenerationEvent]:
        events: asyncio.Queue[GenerationEvent | ServiceError] = asyncio.Queue()
        output = self._model.text_output(len(prompt_token_ids), params)
        sequence = Sequence(
            prompt_token_ids, params, output, Sampler(params, self._model.device), events, deadline
        )
        self._batcher.submit(sequence)
        try:
            while True:
                event = await events.get()
                if isinstance(event, ServiceError):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._batcher.cancel(sequence)

    def drain(self, deadline: float) -> None:
        self._batcher.drain(deadline)

    async def close(self) -> None:
        await asyncio.to_thread(self._batcher.close)

    def _publish(self, events: list[tuple[object, GenerationEvent | ServiceError]]) -> None:
        """Called by the stepping loop's thread once per step."""
        try:
            self._loop.call_soon_threadsafe(_deliver, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _deliver(events: list[tuple[object, GenerationEvent | ServiceError]]) -> None:
    for queue, event in events:
        queue.put_nowait(event)


class ThreadPerRequestScheduler:
    def __init__(self, model: ChatModel, max_running: int, max_waiting: int) -> None:
        self._model = model
        self._executor = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="generate")
        self.max_running = max_running
        self._capacity = max_running + max_waiting
        self._admitted = 0

    def stats(self) -> BatchStats:
        running = min(self._admitted, self.max_running)
        return BatchStats(running=running, waiting=self._admitted - running, kv_tokens_reserved=0)

    @property
    def kv_token_budget(self) -> int:
        return 0  # every generation allocates its own cache as it grows

    def drain(self, deadline: float) -> None:
        """The baseline keeps the old behaviour: generations run until the runtime's grace ends."""

    async def stream(
        self, prompt_token_ids: list[int], params: GenerationParams, deadline: float | None
    ) -> AsyncIterator[GenerationEvent]:
        """Yields what the model generates on a worker thread, as it generates it. The deadline is the
        RPC's: when it passes, the RPC is cancelled and so is the generation."""
        if self._admitted >= self._capacity:
            metrics.refused.add(1, {"reason": "queue_full"})
            raise Overloaded(f"inference is at capacity ({self._capacity} generations running or waiting)")
        generation = self._model.generate(prompt_token_ids, params, cancelled := threading.Event())
        self._admitted += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        worker = loop.run_in_executor(self._executor, self._work, generation, cancelled, loop, queue)
        worker.add_done_callback(lambda _: self._release())
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            cancelled.set()

    @staticmethod
    def _work(
        generation: Iterator[GenerationEvent],
        cancelled: threading.Event,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue,
    ) -> None:
        try:
            if cancelled.is_set():
                return
            for event in generation:
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    def _release(self) -> None:
        self._admitted -= 1

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# The CPU has no free-memory figure worth sizing by; 32768 tokens of the default model take 1.4 GiB.
CPU_KV_TOKEN_BUDGET = 32768


# A prefill pass cannot be cut short: every running stream waits for it, and a cancel or a drain only
# takes effect after it. On the CPU a pass of 2,048 prompt tokens took 24 s (4,030-token prompt, 2 cores)
# while passes of 256 took at most 2.9 s, and the whole prompt went in faster (22 s against 38 s: the
# chunk's attention scores are smaller). So CPU passes take at most this many, whatever is configured.
CPU_MAX_PREFILL_TOKENS = 256


def kv_token_budget(config: InferenceConfig, device: str, bytes_per_token: int) -> int:
    """The configured budget, else a share of the GPU memory free now (the models being loaded)."""
    if config.kv_token_budget:
        return config.kv_token_budget
    if device == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info()
        return int(free_bytes * config.kv_memory_fraction) // bytes_per_token
    return CPU_KV_TOKEN_BUDGET


def build_scheduler(config: InferenceConfig, model: ChatModel) -> GenerationScheduler:
    if config.scheduler is GenerationSchedulerKind.THREAD_PER_REQUEST:
        return ThreadPerRequestScheduler(
            model, config.max_concurrent_generations, config.max_queued_generations
        )
    settings = BatchSettings(
        max_batch_size=config.max_batch_size,
        kv_token_budget=kv_token_budget(
            config, model.device, bytes_per_token(model.model.config, model.torch_dtype)
        ),
        max_waiting=config.max_queued_generations,
        max_prefill_wait_seconds=config.max_prefill_wait_ms / 1000,
        max_prefill_tokens=(
            min(config.max_prefill_tokens, CPU_MAX_PREFILL_TOKENS)
            if model.device == "cpu"
            else config.max_prefill_tokens
        ),
        batch_invariant=config.batch_invariant,
    )
    return ContinuousScheduler(model, settings)
