"""The Gateway's own view of a request and its answer, free of protobuf and of any provider's format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    task_type: str = ""
    model_preference: str = ""


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
class Principal:
    """Who is calling: the tenant and the API key, with the key's limits (0 = unlimited)."""

    tenant_id: str
    key_id: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
