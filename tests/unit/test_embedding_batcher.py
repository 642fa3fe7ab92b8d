"""The micro-batcher: a lone text goes at once, concurrent texts share one model call."""

import asyncio
import threading
import time

import numpy as np
import pytest

from libs.embedding_batcher import EmbeddingBatcher


class SlowModel:
    def __init__(self, seconds: float = 0.05) -> None:
        self.calls: list[int] = []
        self.seconds = seconds
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def __call__(self, texts):
        with self.lock:
            self.calls.append(len(texts))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return np.array([[float(len(text)), 1.0] for text in texts], dtype=np.float32)


async def test_a_lone_text_is_embedded_without_waiting():
    model = SlowModel(0.0)
    batcher = EmbeddingBatcher(model, max_batch=32, max_wait_seconds=0.05)

    async def never(wait):
        raise AssertionError("an idle batcher must not hold a text to fill a batch")

    batcher._fill = never
    assert (await batcher.embed("hello")).tolist() == [5.0, 1.0]
    await batcher.close()


async def test_concurrent_texts_share_batches_and_get_their_own_vectors():
    model = SlowModel(0.05)
    batcher = EmbeddingBatcher(model, max_batch=8, max_wait_seconds=0.002)
    texts = [f"text number {i}" + "x" * i for i in range(20)]
    vectors = await asyncio.gather(*(batcher.embed(text) for text in texts))
    assert [v[0] for v in vectors] == [float(len(text)) for text in texts]
    assert sum(model.calls) == 20
    assert len(model.calls) < 20 and max(model.calls) <= 8
    await batcher.close()


async def test_a_failing_model_fails_its_batch_only():
    calls = []

    def flaky(texts):
        calls.append(texts)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return np.ones((len(texts), 2), dtype=np.float32)

    batcher = EmbeddingBatcher(flaky, max_batch=4)
    with pytest.raises(RuntimeError):
        await batcher.embed("a")
    assert (await batcher.embed("b")).tolist() == [1.0, 1.0]
    await batcher.close()


def test_the_wait_is_bounded():
    with pytest.raises(ValueError):
        EmbeddingBatcher(SlowModel(), max_wait_seconds=0.5)


@pytest.mark.parametrize("workers", [1, 2])
async def test_workers_bound_the_batches_computed_at_once(workers):
    model = SlowModel(0.05)
    batcher = EmbeddingBatcher(model, max_batch=4, max_wait_seconds=0, workers=workers)
    await asyncio.gather(*(batcher.embed(f"t{i}") for i in range(12)))
    assert model.most_at_once == workers
    assert sum(model.calls) == 12
    await batcher.close()
