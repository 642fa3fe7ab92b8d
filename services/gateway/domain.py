"""The Gateway's own view of a request and its answer, free of protobuf and of any provider's format."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.gateway.access.roles import KeyScope


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool ("developer" arrives as "system")
    content: str
    name: str = ""
    tool_call_id: str = ""
    # Assistant tool calls: ({"id", "type": "function", "function": {"name", "arguments"}}, ...).
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    model: str  # a configured model id, or "auto"
    messages: tuple[Message, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, int] = field(default_factory=dict)
    user: str = ""
    # OpenAI-shaped tool definitions ({"type": "function", "function": {...}}) and tool_choice.
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    include_usage: bool = False
    use_cache: bool = True
    # Cache-Control: no-store: the cache may answer, but this answer is not stored.
    store_in_cache: bool = True
    task_type: str = ""
    model_preference: str = ""

    def estimated_prompt_tokens(self) -> int:
        """Everything the provider reads as prompt: the messages, and the tool schemas, tool choice and
        response format it is sent beside them (a provider counts those as input tokens too)."""
        return (
            estimated_prompt_tokens(self.messages)
            + _estimated_json_tokens(self.tools)
            + _estimated_json_tokens(self.tool_choice)
            + _estimated_json_tokens(self.response_format)
        )


@dataclass(frozen=True)
class Target:
    model_id: str  # the public id, e.g. "gpt-4o-mini"
    provider: str  # the provider name in config
    provider_model: str  # the name the provider knows the model by


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length | tool_calls | content_filter | cancelled
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass
class CompletionChunk:
    """A piece of a streamed answer; the last one carries finish_reason and the usage."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class EmbeddingInputs:
    """What to embed: texts, or token ids (for models that accept them); one of the two is empty.
    `typed`: the caller used the typed gRPC fields, so the answer carries typed vectors."""

    texts: tuple[str, ...]
    token_arrays: tuple[tuple[int, ...], ...]
    typed: bool

    def __len__(self) -> int:
        return len(self.texts) or len(self.token_arrays)

    def estimated_tokens(self) -> int:
        return estimated_input_tokens(self.texts or self.token_arrays)

    def provider_input(self) -> list[str] | list[list[int]]:
        """The OpenAI wire form: a list of strings or a list of token arrays."""
        return list(self.texts) if self.texts else [list(array) for array in self.token_arrays]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the API key, with the key's limits (0 = unlimited) and scope."""

    tenant_id: str
    key_id: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    scope: KeyScope = field(default_factory=KeyScope)


# Token counts where no tokenizer counted (admission estimates, a stream cut off before the provider's
# usage arrived, an answer that came without usage): English runs about four characters a token, code
# and other scripts fewer, so three errs towards charging a little more, never less. Each message adds a
# few tokens of framing (role, separators) on top of its text.
ESTIMATE_CHARS_PER_TOKEN = 3
# The finish reason of an answer that did not finish: a stream cut short, or one its model stopped early.
CUT_SHORT = "cancelled"
MESSAGE_FRAMING_TOKENS = 4


def _estimated_chars_tokens(chars: int) -> int:
    return -(-chars // ESTIMATE_CHARS_PER_TOKEN)


def estimated_text_tokens(text: str) -> int:
    """A conservative token count of `text`: never 0 for text that is not empty."""
    return _estimated_chars_tokens(len(text))


def _estimated_json_tokens(value: Any) -> int:
    """Structured prompt parts (tool schemas, tool calls, a response format) reach the model as JSON, so
    they are estimated as the JSON text they are sent as."""
    return estimated_text_tokens(json.dumps(value)) if value else 0


def _estimated_message_tokens(message: Message) -> int:
    return (
        MESSAGE_FRAMING_TOKENS
        + estimated_text_tokens(message.content)
        + estimated_text_tokens(message.name)
        + estimated_text_tokens(message.tool_call_id)
        + _estimated_json_tokens(message.tool_calls)
    )


def estimated_prompt_tokens(messages: tuple[Message, ...]) -> int:
    """The messages alone; `ChatRequest.estimated_prompt_tokens` adds what travels beside them."""
    return sum(map(_estimated_message_tokens, messages))


def estimated_input_tokens(inputs: Sequence[str] | Sequence[Sequence[int]]) -> int:
    """Embedding inputs: texts estimated, token arrays counted exactly."""
    return sum(estimated_text_tokens(i) if isinstance(i, str) else len(i) for i in inputs)


def _generated_chars(call: dict[str, Any]) -> int:
    """The characters of a tool call (or of a streamed fragment of one) that the model generated."""
    function = call.get("function") or {}
    return len(str(function.get("name") or "")) + len(str(function.get("arguments") or ""))


def _estimated_answer_tokens(text: str, tool_call_chars: int) -> int:
    return estimated_text_tokens(text) + _estimated_chars_tokens(tool_call_chars)


def with_estimated_usage(completion: Completion, request: ChatRequest) -> Completion:
    """`completion` with the counts its provider left out (absent, null or 0) estimated, as a cut
    stream's are. A 0 counts as left out: no prompt is 0 tokens, nor is an answer with content, and an
    empty answer's estimate is 0 anyway, so a 0 the provider meant is kept."""
    if completion.prompt_tokens and completion.completion_tokens:
        return completion
    tool_call_chars = sum(map(_generated_chars, completion.tool_calls))
    answer_estimate = _estimated_answer_tokens(completion.text, tool_call_chars)
    return dataclasses.replace(
        completion,
        prompt_tokens=completion.prompt_tokens or request.estimated_prompt_tokens(),
        completion_tokens=completion.completion_tokens or answer_estimate,
    )


@dataclass
class StreamTally:
    """What a stream has delivered so far, and what it is billed for however it ends.

    The provider's counts are used where it sent them (OpenAI's and Anthropic's usage events, the local
    model's running counts on every chunk); a stream cut off before them is billed for its prompt and
    the text and tool calls it delivered, estimated conservatively, so content sent is never free.
    """

    prompt_estimate: int
    text: list[str] = field(default_factory=list)
    tool_call_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    def add(self, chunk: CompletionChunk) -> None:
        self.text.append(chunk.text)
        self.tool_call_chars += sum(map(_generated_chars, chunk.tool_calls))
        self.prompt_tokens = max(self.prompt_tokens, chunk.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, chunk.completion_tokens)
        self.finish_reason = chunk.finish_reason or self.finish_reason

    @property
    def saw_tool_calls(self) -> bool:
        return self.tool_call_chars > 0

    def completion(self) -> Completion:
        text = "".join(self.text)
        return Completion(
            text=text,
            finish_reason=self.finish_reason or CUT_SHORT,
            prompt_tokens=self.prompt_tokens or self.prompt_estimate,
            completion_tokens=self.completion_tokens or _estimated_answer_tokens(text, self.tool_call_chars),
        )
