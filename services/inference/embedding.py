"""Embed calls coalesced: the texts of concurrent calls share one forward pass of the embedding model.

The shared micro-batcher (libs/embedding_batcher.py) runs the model on a thread of its own, so embeddings
never queue behind generations (which have the stepping loop's thread) and vice versa.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from transformers import AutoTokenizer

from libs.embedding_batcher import EmbeddingBatcher
from libs.sentence_embeddings import EMBEDDING_MAX_TOKENS, EmbeddingModel, embedding_model_dir
from services.inference import metrics


class EmbeddingPool:
    def __init__(
        self, model: EmbeddingModel, weights_dir: pathlib.Path, max_batch: int, max_wait_seconds: float
    ) -> None:
        self.model = model
        # The token count of each text, for usage: EmbeddingModel reports only a whole batch's count, and a
        # batch now mixes several calls. A tokenizer of our own (cheap, and never shared with the model's
        # thread) counts exactly what the model reads.
        self._tokenizer = AutoTokenizer.from_pretrained(
            embedding_model_dir(model.id, weights_dir), local_files_only=True
        )
        self._batcher = EmbeddingBatcher(
            model.embed_array,
            max_batch=max_batch,
            max_wait_seconds=max_wait_seconds,
            on_batch=metrics.embedding_batch_size.record,
        )

    async def embed(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """One vector per text and the tokens the model read for all of them."""
        vectors = await self._batcher.embed_many(texts)
        counted = self._tokenizer(list(texts), truncation=True, max_length=EMBEDDING_MAX_TOKENS).input_ids
        return vectors, sum(len(ids) for ids in counted)

    async def close(self) -> None:
        await self._batcher.close()
