"""The prompt embedding the classifier reads: all-MiniLM-L6-v2 over `normalise_text(prompt)`, exactly
what the SemanticCache's Lookup returns, so the Router can use the cache's vector or compute the same
one itself.

Example embeddings are kept between starts in one file per example set (`<cache_dir>/<digest>.npz`,
keyed by each text's digest), so a restart or a reload embeds only the examples that changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from libs import deadline
from libs.sentence_embeddings import EmbeddingModel, normalise_text

log = logging.getLogger(__name__)

# Kept from the caller's deadline for the rest of the Route and the answer's way back.
DEADLINE_MARGIN_SECONDS = 0.05


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class PromptEmbedder:
    def __init__(self, model: EmbeddingModel) -> None:
        self._model = model

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        return self._model.embed_array([normalise_text(p) for p in prompts])

    def embed_cached(
        self,
        prompts: Sequence[str],
        cache_dir: str | os.PathLike[str],
        seed: str | os.PathLike[str] | None = None,
    ) -> np.ndarray:
        """Embeddings of many prompts, reusing those computed before for the same normalised text: from
        `seed` (a read-only file shipped beside the examples) and from `cache_dir` (written here)."""
        texts = [normalise_text(p) for p in prompts]
        keys = [_digest(t) for t in texts]
        path = pathlib.Path(cache_dir) / f"{self._model.id}.npz"
        known = {**_stored(seed), **_stored(path)} if seed else _stored(path)
        missing = sorted({k: t for k, t in zip(keys, texts, strict=False) if k not in known}.items())
        if missing:
            log.info("embedding %d example prompts (%d known)", len(missing), len(keys) - len(missing))
            vectors = self._model.embed_array([t for _, t in missing])
            known.update({key: vector for (key, _), vector in zip(missing, vectors, strict=False)})
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".partial.npz")
                np.savez(partial, **{key: known[key] for key in set(known) - set(_stored(seed))})
                os.replace(partial, path)
            except OSError as exc:
                log.warning("example embeddings not kept in %s: %s", path, exc)
        return np.stack([known[key] for key in keys]).astype(np.float32)


class BoundedEmbedding:
    """The Router's own embedding of a prompt that came without the cache's: bounded in time (its own
    limit and the caller's deadline) and in concurrency, so a Route answers in time even when the
    model is slow or busy; None when it cannot, and the prompt is routed unclassified."""

    def __init__(self, embedder: PromptEmbedder, timeout_seconds: float, max_concurrent: int) -> None:
        self._embedder = embedder
        self.timeout_seconds = timeout_seconds
        self.max_concurrent = max_concurrent
        # Embeddings running, including those whose Route stopped waiting (a thread cannot be stopped).
        self._running = 0

    async def __call__(self, prompt: str) -> Sequence[float] | None:
        budget = self.timeout_seconds
        left = deadline.remaining()
        if left is not None:
            budget = min(budget, left - DEADLINE_MARGIN_SECONDS)
        if budget <= 0 or self._running >= self.max_concurrent:
            return None
        self._running += 1
        work = asyncio.ensure_future(asyncio.to_thread(self._embedder.embed_prompts, [prompt]))
        work.add_done_callback(self._finished)
        try:
            vectors = await asyncio.wait_for(asyncio.shield(work), budget)
        except TimeoutError:
            return None
        return vectors[0]

    def _finished(self, work: asyncio.Future) -> None:
        self._running -= 1
        if not work.cancelled() and work.exception() is not None:
            log.error("embedding a prompt failed: %s", work.exception())


def _stored(path: str | os.PathLike[str] | None) -> dict[str, np.ndarray]:
    if path is None:
        return {}
    try:
        with np.load(path) as stored:
            return {key: stored[key].astype(np.float32) for key in stored.files}
    except (OSError, ValueError):
        return {}


def seed_path(examples_file: pathlib.Path) -> pathlib.Path:
    """The shipped embeddings of an examples file: `router_examples.yaml` → `router_examples.npz`."""
    return examples_file.with_suffix(".npz")


def write_seed(path: pathlib.Path, prompts: Sequence[str], vectors: np.ndarray) -> None:
    """Ships the examples' embeddings (float16: ample for a linear model) so no start-up embeds them."""
    keys = [_digest(normalise_text(p)) for p in prompts]
    np.savez_compressed(path, **{key: v.astype(np.float16) for key, v in zip(keys, vectors, strict=True)})
