"""EmbeddingPool: token counts come from the batcher's thread, never the event loop, and a huge text is cut
before anything tokenizes it."""

from __future__ import annotations

import os
import pathlib
import threading

import numpy as np

from libs.sentence_embeddings import EMBEDDING_MAX_TOKENS, EMBEDDING_MODEL_ID
from services.inference.embedding import MAX_EMBED_TEXT_CHARS, EmbeddingPool

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WEIGHTS_DIR = pathlib.Path(os.environ.get("SOPHIA_WEIGHTS_DIR") or REPO_ROOT / "var" / "models")


class FakeModel:
    """The embedding model's interface, minus the model: records the texts it is given."""

    id = EMBEDDING_MODEL_ID
    dimensions = 2

    def __init__(self) -> None:
        self.texts: list[str] = []

    def embed_array(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return np.array([[float(len(text)), 1.0] for text in texts], dtype=np.float32)


class RecordingTokenizer:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.threads: set[int] = set()
        self.longest = 0

    def __call__(self, texts, **kwargs):
        self.threads.add(threading.get_ident())
        self.longest = max(self.longest, *map(len, texts))
        return self._tokenizer(texts, **kwargs)


async def test_tokens_are_counted_off_the_event_loop_and_huge_texts_are_cut_first():
    model = FakeModel()
    pool = EmbeddingPool(model, WEIGHTS_DIR, max_batch=8, max_wait_seconds=0.0)
    real_tokenizer = pool._tokenizer
    pool._tokenizer = recorder = RecordingTokenizer(real_tokenizer)
    try:
        vectors, tokens = await pool.embed(["a short text", "word " * 400_000])
    finally:
        await pool.close()
    assert threading.get_ident() not in recorder.threads  # a long count would stall every stream
    assert recorder.longest <= MAX_EMBED_TEXT_CHARS and max(map(len, model.texts)) <= MAX_EMBED_TEXT_CHARS
    short = len(real_tokenizer("a short text").input_ids)
    assert tokens == short + EMBEDDING_MAX_TOKENS  # what the model reads: the long one is truncated
    assert [vector[0] for vector in vectors] == [12.0, MAX_EMBED_TEXT_CHARS]
