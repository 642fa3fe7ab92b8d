"""The cache's embedder: all-MiniLM-L6-v2 in-process (libs/sentence_embeddings.py) behind the
micro-batcher (libs/embedding_batcher.py), on CUDA when present."""

from __future__ import annotations

import numpy as np
import torch

from libs.config import CacheConfig, SemanticCacheConfig
from libs.embedding_batcher import EmbeddingBatcher
from libs.sentence_embeddings import EMBEDDING_MODEL_ID, EmbeddingModel, load_embedding_model
from services.cache import metrics
from services.cache.domain import Cache
from services.cache.guards import QuestionGuards


class BatchedEmbedder:
    def __init__(self, model: EmbeddingModel, config: SemanticCacheConfig) -> None:
        self.model = model
        self.dimensions = model.dimensions
        self._batcher = EmbeddingBatcher(
            model.embed_array,
            max_batch=config.embedding_batch_max,
            max_wait_seconds=config.embedding_batch_wait_ms / 1000,
            workers=config.embedding_workers,
            on_batch=lambda size: metrics.embedding_batch_size.record(size),
        )

    async def embed(self, text: str) -> np.ndarray:
        """`text` must be normalised already (libs.sentence_embeddings.normalise_text)."""
        return await self._batcher.embed(text)

    async def close(self) -> None:
        await self._batcher.close()


def load_embedder(config: SemanticCacheConfig, weights_dir: str | None = None) -> BatchedEmbedder:
    if config.embedding_threads:
        torch.set_num_threads(config.embedding_threads)
    model = load_embedding_model(
        EMBEDDING_MODEL_ID,
        weights_dir=weights_dir,
        device=config.device,
        int8=config.int8,
        runtime=config.embedding_runtime,
        threads=config.embedding_threads,
    )
    return BatchedEmbedder(model, config)


def build_cache(redis, config: CacheConfig, weights_dir: str | None = None) -> Cache:
    """The cache as the service runs it: the packaged model behind the batcher, and the guards that
    know the model's vocabulary. tools/eval_semantic_cache and tools/bench_cache build it the same way."""
    embedder = load_embedder(config.semantic, weights_dir)
    return Cache(redis, config, embedder, QuestionGuards(embedder.model.vocabulary()))
