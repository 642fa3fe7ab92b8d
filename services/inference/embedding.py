"""Embed calls coalesced: the texts of concurrent calls share one forward pass of the embedding model.

The shared micro-batcher (libs/embedding_batcher.py) runs the model on a thread of its own, so embeddings
never queue behind generations (which have the stepping loop's thread) and vice versa.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Sequence

import numpy as np
from transformers import AutoTokenizer

from libs.embedding_batcher import EmbeddingBatcher
from libs.sentence_embeddings import EMBEDDING_MAX_TOKENS, EmbeddingModel, embedding_model_dir
from services.inference import metrics

# The model reads a text's first EMBEDDING_MAX_TOKENS tokens only, yet tokenizing costs time in the whole
# text's length (seconds for a few megabytes). So texts are cut to this many characters first: 64 per token
# read, where English runs about 4 and a WordPiece word of over 100 characters is one token. Only a text
# whose first 256 tokens span more (whitespace runs, giant words) can come out differently.
MAX_EMBED_TEXT_CHARS = EMBEDDING_MAX_TOKENS * 64


class EmbeddingPool:
    def __init__(
        self, model: EmbeddingModel, weights_dir: pathlib.Path, max_batch: int, max_wait_seconds: float
    ) -> None:
        self.model = model
        # The token count of each text, for usage: EmbeddingModel reports only a whole batch's count, and a
        # batch mixes several calls. A tokenizer of our own counts exactly what the model reads, on the
        # batcher's thread beside the model (never on the event loop, which every stream shares).
        self._tokenizer = AutoTokenizer.from_pretrained(
            embedding_model_dir(model.id, weights_dir), local_files_only=True
        )
        # A fast tokenizer reconfigures itself on its first truncating call; concurrent ones would clash.
        self._tokenizer_lock = threading.Lock()
        self._batcher = EmbeddingBatcher(
            self._embed_and_count,
            max_batch=max_batch,
            max_wait_seconds=max_wait_seconds,
            on_batch=metrics.embedding_batch_size.record,
        )

    async def embed(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """One vector per text and the tokens the model read for all of them."""
        results = await self._batcher.embed_many([text[:MAX_EMBED_TEXT_CHARS] for text in texts])
        return [vector for vector, _ in results], sum(tokens for _, tokens in results)

    def _embed_and_count(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """On the batcher's thread: (vector, tokens read) for each text."""
        with self._tokenizer_lock:
            counted = self._tokenizer(texts, truncation=True, max_length=EMBEDDING_MAX_TOKENS).input_ids
        return list(zip(self.model.embed_array(texts), map(len, counted), strict=True))

    async def close(self) -> None:
        await self._batcher.close()
