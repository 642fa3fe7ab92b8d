"""python -m services.inference.prepare — converts the packaged GGUF weights once, at install time.

The first load dequantises the GGUF file and writes safetensors into `inference.weights_dir`, and the
SemanticCache's ONNX Runtime graph of the embedding model is exported (and quantised to int8) there
too; doing both during `make install` keeps the first `make up` (and every test run) to a few seconds.
"""

import time

from libs.config import REPO_ROOT, EmbeddingRuntime, load_config_or_exit
from libs.sentence_embeddings import load_embedding_model
from services.inference.engine import load_chat_model


def main() -> None:
    settings = load_config_or_exit()
    config = settings.inference
    weights_dir = REPO_ROOT / config.weights_dir
    started = time.perf_counter()
    chat = load_chat_model(config.chat_model, weights_dir, "cpu", cpu_packed_weights=False)
    # The int8 graph is made from the float32 one, so both end up on disk when the cache uses int8.
    embedding = load_embedding_model(
        config.embedding_model, weights_dir, "cpu", runtime=EmbeddingRuntime.ONNXRUNTIME,
        int8=settings.cache.semantic.int8,
    )  # fmt: skip
    print(
        f"models ready in {time.perf_counter() - started:.1f}s: {chat.id} and {embedding.id} "
        f"({embedding.dimensions} dims), weights in {weights_dir}"
    )


if __name__ == "__main__":
    main()
