"""Providers that speak the OpenAI Chat Completions API (OpenAI itself and the many compatible servers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from services.gateway.domain import (
    ChatRequest,
    Completion,
    CompletionChunk,
    Message,
    Target,
    estimated_input_tokens,
    with_estimated_usage,
)
from services.gateway.providers.base import ProviderError
from services.gateway.providers.http import HttpProvider

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the pre-tools name some compatible servers still send
    "content_filter": "content_filter",
}


def _finish_reason(value: Any) -> str:
    return _FINISH_REASONS.get(value, "stop")


def _message(message: Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        wire["name"] = message.name
    if message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        wire["tool_calls"] = list(message.tool_calls)
        # An assistant turn that only calls tools has no content rather than an empty one.
        if not message.content:
            wire["content"] = None
    return wire


def chat_body(target: Target, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """The JSON body for /chat/completions; optional fields appear only when the caller set them."""
    body: dict[str, Any] = {
        "model": target.provider_model,
        "messages": [_message(m) for m in request.messages],
    }
    optional = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "response_format": request.response_format,
        "stop": list(request.stop) or None,
        "logit_bias": request.logit_bias or None,
        "user": request.user or None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    # OpenAI refuses tool_choice and parallel_tool_calls on a request without tools.
    if request.tools:
        body["tools"] = list(request.tools)
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    return {
        "id": str(call["id"]),
        "type": "function",
        "function": {"name": str(function["name"]), "arguments": str(function.get("arguments") or "")},
    }


def _completion(payload: dict[str, Any]) -> Completion:
    choice = payload["choices"][0]
    message = choice["message"]
    usage = payload.get("usage") or {}
    return Completion(
        text=message.get("content") or "",
        finish_reason=_finish_reason(choice.get("finish_reason")),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        tool_calls=tuple(_tool_call(call) for call in message.get("tool_calls") or ()),
    )


class OpenAICompatibleProvider(HttpProvider):
    def _auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def unsupported(self, request: ChatRequest) -> tuple[str, str] | None:
        return None  # the domain request is modelled on this API: everything in it has a wire field

    async def complete(self, target: Target, request: ChatRequest) -> Completion:
        payload = await self._post_json("/chat/completions", chat_body(target, request, stream=False))
        with self._reading("unexpected completion shape"):
            completion = _completion(payload)
        return with_estimated_usage(completion, request)

    async def stream(self, target: Target, request: ChatRequest) -> AsyncIterator[CompletionChunk]:
        finish_reason: str | None = None
        prompt_tokens = completion_tokens = 0
        done = False
        body = chat_body(target, request, stream=True)
        events = self._post_sse("/chat/completions", body, is_last=lambda event: event.data == "[DONE]")
        async with aclosing(events):
            async for event in events:
                if event.data == "[DONE]":
                    if finish_reason is None:
                        raise self._dropped()
                    done = True
                    yield CompletionChunk(
                        finish_reason=finish_reason,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                    )
                    continue  # the loop ends once the rest of the body is read, keeping the connection
                payload = self._parse_json(event.data)
                if "error" in payload:
                    raise self._stream_error(payload)
                with self._reading("unexpected stream chunk shape"):
                    usage = payload.get("usage")
                    if usage:
                        prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        completion_tokens = int(usage.get("completion_tokens") or 0)
                    chunk, choice_finish = _chunk(payload)
                if choice_finish is not None:
                    finish_reason = choice_finish
                if chunk is not None:
                    yield chunk
        if done:
            return
        # Some compatible servers end the stream without [DONE]; an answer without a finish reason is cut off.
        if finish_reason is None:
            raise self._dropped()
        yield CompletionChunk(
            finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )

    async def embed(
        self, target: Target, inputs: list[str] | list[list[int]], dimensions: int | None = None
    ) -> tuple[list[list[float]], int]:
        body: dict[str, Any] = {"model": target.provider_model, "input": inputs}
        if dimensions is not None:
            body["dimensions"] = dimensions
        payload = await self._post_json("/embeddings", body)
        with self._reading("unexpected embeddings shape"):
            rows = sorted(payload["data"], key=lambda row: int(row.get("index", 0)))
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
            prompt_tokens = int((payload.get("usage") or {}).get("prompt_tokens") or 0)
        # An answer without usage (or with 0 for inputs that are not empty) is billed for an estimate.
        prompt_tokens = prompt_tokens or estimated_input_tokens(inputs)
        if len(vectors) != len(inputs):
            raise ProviderError(
                f"provider {self.name} returned {len(vectors)} embeddings for {len(inputs)} inputs",
                retryable=True,
                kind="bad_response",
            )
        return vectors, prompt_tokens


def _chunk(payload: dict[str, Any]) -> tuple[CompletionChunk | None, str | None]:
    """The text and tool-call deltas of one stream chunk (None when it has none), and its finish reason."""
    for choice in payload.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue  # n > 1 is not part of the domain request; only the first choice is ours
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        tool_calls = tuple(delta.get("tool_calls") or ())
        finish = choice.get("finish_reason")
        chunk = CompletionChunk(text=text, tool_calls=tool_calls) if text or tool_calls else None
        return chunk, None if finish is None else _finish_reason(finish)
    return None, None
