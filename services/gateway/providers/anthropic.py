"""Anthropic's Messages API, translated to and from the Gateway's OpenAI-shaped domain."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from services.gateway.domain import (
    ChatRequest,
    Completion,
    CompletionChunk,
    Message,
    Target,
    with_estimated_usage,
)
from services.gateway.providers.base import ProviderError
from services.gateway.providers.http import HttpProvider

API_VERSION = "2023-06-01"
# The Messages API requires max_tokens; this is what a request that set none gets.
DEFAULT_MAX_TOKENS = 1024
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _finish_reason(stop_reason: Any) -> str:
    return _STOP_REASONS.get(stop_reason, "stop")


def _tool_arguments(arguments: str) -> Any:
    """Anthropic wants a tool call's input as an object; OpenAI carries it as a JSON string."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments}


def _content_blocks(message: Message) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content}]
    blocks: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    for call in message.tool_calls:
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id", ""),
                "name": function.get("name", ""),
                "input": _tool_arguments(function.get("arguments", "")),
            }
        )
    return blocks


def _messages(messages: tuple[Message, ...]) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, conversation): tool results travel as user turns, and same-role turns merge
    because the API wants user and assistant turns to alternate."""
    system = [m.content for m in messages if m.role == "system"]
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        simple = message.role != "tool" and not message.tool_calls
        if turns and turns[-1]["role"] == role:
            previous = turns[-1]
            if isinstance(previous["content"], str):
                previous["content"] = [{"type": "text", "text": previous["content"]}]
            previous["content"].extend(_content_blocks(message))
        else:
            turns.append({"role": role, "content": message.content if simple else _content_blocks(message)})
    return "\n\n".join(system), turns


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    wire: dict[str, Any] = {
        "name": function.get("name", ""),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        wire["description"] = function["description"]
    return wire


def _tool_choice(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if isinstance(choice, dict):
        wire: dict[str, Any] = {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    elif choice == "required":
        wire = {"type": "any"}
    elif choice == "none":
        wire = {"type": "none"}
    elif choice == "auto" or request.parallel_tool_calls is False:
        wire = {"type": "auto"}
    else:
        return None
    if request.parallel_tool_calls is False and wire["type"] != "none":
        wire["disable_parallel_tool_use"] = True
    return wire


def messages_body(target: Target, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    system, turns = _messages(request.messages)
    body: dict[str, Any] = {
        "model": target.provider_model,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": turns,
    }
    if system:
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.tools:
        body["tools"] = [_tool(tool) for tool in request.tools]
        choice = _tool_choice(request)
        if choice is not None:
            body["tool_choice"] = choice
    if stream:
        body["stream"] = True
    return body


def _completion(payload: dict[str, Any]) -> Completion:
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in payload["content"]:
        if block["type"] == "text":
            texts.append(block["text"])
        elif block["type"] == "tool_use":
            tool_calls.append(
                {
                    "id": str(block["id"]),
                    "type": "function",
                    "function": {
                        "name": str(block["name"]),
                        "arguments": json.dumps(block.get("input") or {}),
                    },
                }
            )
    usage = payload.get("usage") or {}
    return Completion(
        text="".join(texts),
        finish_reason=_finish_reason(payload.get("stop_reason")),
        prompt_tokens=int(usage.get("input_tokens") or 0),
        completion_tokens=int(usage.get("output_tokens") or 0),
        tool_calls=tuple(tool_calls),
    )


class _StreamState:
    """What a Messages stream has told so far; turns each event into the chunk it carries, if any."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.stop_reason: str | None = None
        # Content block index → OpenAI tool call index (tool calls are numbered among themselves).
        self._tool_indexes: dict[int, int] = {}

    def chunk(self, payload: dict[str, Any]) -> CompletionChunk | None:
        kind = payload.get("type")
        if kind == "message_start":
            # Its output_tokens is a placeholder (1 or so), not the answer's count: only message_delta's
            # is, and without one the answer is billed for the text it delivered.
            usage = payload["message"].get("usage") or {}
            self.prompt_tokens = int(usage.get("input_tokens") or 0)
        elif kind == "content_block_start":
            block = payload["content_block"]
            if block["type"] == "text" and block.get("text"):
                return CompletionChunk(text=block["text"])
            if block["type"] == "tool_use":
                index = self._tool_indexes[payload["index"]] = len(self._tool_indexes)
                call = {"index": index, "id": block["id"], "type": "function"}
                call["function"] = {"name": block["name"], "arguments": ""}
                return CompletionChunk(tool_calls=(call,))
        elif kind == "content_block_delta":
            delta = payload["delta"]
            if delta["type"] == "text_delta" and delta["text"]:
                return CompletionChunk(text=delta["text"])
            if delta["type"] == "input_json_delta" and delta["partial_json"]:
                index = self._tool_indexes[payload["index"]]
                return CompletionChunk(
                    tool_calls=({"index": index, "function": {"arguments": delta["partial_json"]}},)
                )
        elif kind == "message_delta":
            self.stop_reason = _finish_reason((payload.get("delta") or {}).get("stop_reason"))
            usage = payload.get("usage") or {}
            if usage.get("output_tokens"):
                self.completion_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens"):
                self.prompt_tokens = int(usage["input_tokens"])
        return None

    def final(self) -> CompletionChunk:
        return CompletionChunk(
            finish_reason=self.stop_reason or "stop",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


class AnthropicProvider(HttpProvider):
    def _auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key, "anthropic-version": API_VERSION}

    def unsupported(self, request: ChatRequest) -> tuple[str, str] | None:
        if request.logit_bias:
            return "logit_bias", "not supported by Anthropic models"
        if request.seed is not None:
            return "seed", "not supported by Anthropic models"
        if request.presence_penalty:
            return "presence_penalty", "not supported by Anthropic models (use 0)"
        if request.frequency_penalty:
            return "frequency_penalty", "not supported by Anthropic models (use 0)"
        if request.temperature is not None and request.temperature > 1:
            return "temperature", "Anthropic models accept 0 to 1"
        if request.response_format and request.response_format.get("type", "text") != "text":
            return "response_format", "only {'type': 'text'} is supported by Anthropic models"
        return None

    async def complete(self, target: Target, request: ChatRequest) -> Completion:
        payload = await self._post_json("/v1/messages", messages_body(target, request, stream=False))
        with self._reading("unexpected message shape"):
            completion = _completion(payload)
        return with_estimated_usage(completion, request)

    async def stream(self, target: Target, request: ChatRequest) -> AsyncIterator[CompletionChunk]:
        state = _StreamState()
        stopped = False
        body = messages_body(target, request, stream=True)
        events = self._post_sse("/v1/messages", body, is_last=lambda event: event.event == "message_stop")
        async with aclosing(events):
            async for event in events:
                payload = self._parse_json(event.data)
                kind = payload.get("type")
                if kind == "error":
                    raise self._stream_error(payload)
                if kind == "message_stop":
                    stopped = True
                    yield state.final()
                    continue  # the loop ends once the rest of the body is read, keeping the connection
                with self._reading("unexpected stream event shape"):
                    chunk = state.chunk(payload)
                if chunk is not None:
                    # message_start's input count rides on every chunk: a stream cut off before
                    # message_delta is still billed for the prompt the provider counted.
                    chunk.prompt_tokens = state.prompt_tokens
                    yield chunk
        if not stopped:
            raise self._dropped()

    async def embed(
        self, target: Target, inputs: list[str], dimensions: int | None = None
    ) -> tuple[list[list[float]], int]:
        raise ProviderError(
            f"provider {self.name} has no embeddings API",
            retryable=False,
            status="INVALID_ARGUMENT",
            kind="unsupported",
        )
