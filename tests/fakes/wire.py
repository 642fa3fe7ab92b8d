"""The fake provider's replies: requests of either wire format reduced to one conversation, a
deterministic answer to it, and that answer written back in the OpenAI or Anthropic format."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Conversation:
    """A chat request of either format, reduced to what the deterministic reply depends on."""

    texts: list[str]  # every message's text, system prompt included (for prompt tokens)
    last_text: str
    last_is_tool_result: bool
    tools: list[str]  # tool names
    chosen_tool: str | None  # None: no tool call wanted
    max_tokens: int | None
    stop: list[str]


@dataclass
class Reply:
    text: str = ""
    finish: str = "stop"  # stop | length | stop_sequence | tool_calls
    stop_sequence: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_name: str = ""
    tool_arguments: str = ""
    words: list[str] = field(default_factory=list)

    def pieces(self) -> list[str]:
        """The text in the pieces a stream sends: one word each."""
        return [word + " " for word in self.words[:-1]] + self.words[-1:]


class BadRequest(Exception):
    pass


def count_words(text: str) -> int:
    return len(text.split())


def reply_to(conversation: Conversation) -> Reply:
    prompt_tokens = sum(count_words(text) for text in conversation.texts)
    if conversation.chosen_tool and not conversation.last_is_tool_result:
        arguments = json.dumps({"query": conversation.last_text})
        return Reply(
            finish="tool_calls",
            prompt_tokens=prompt_tokens,
            completion_tokens=count_words(arguments),
            tool_name=conversation.chosen_tool,
            tool_arguments=arguments,
        )
    source = conversation.last_text
    text = "tool result: " + source if conversation.last_is_tool_result else source
    text = " ".join(text.split())
    reply = Reply(prompt_tokens=prompt_tokens)
    found = [(text.find(stop), stop) for stop in conversation.stop if stop and stop in text]
    if found:
        at, reply.stop_sequence = min(found)
        text, reply.finish = text[:at], "stop_sequence"
    words = text.split()
    if conversation.max_tokens is not None and len(words) > conversation.max_tokens:
        words, reply.finish, reply.stop_sequence = words[: conversation.max_tokens], "length", None
    reply.words, reply.text, reply.completion_tokens = words, " ".join(words), len(words)
    return reply


def _text_of(content: Any) -> str:
    """Text of an OpenAI or Anthropic content value: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") == "tool_result":
                parts.append(_text_of(part.get("content", "")))
        return " ".join(parts)
    return ""


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise BadRequest(message)


def openai_conversation(body: Any) -> Conversation:
    _need(isinstance(body, dict), "request body must be a JSON object")
    _need(isinstance(body.get("model"), str) and body["model"], "you must provide a model parameter")
    messages = body.get("messages")
    _need(isinstance(messages, list) and bool(messages), "'messages' must be a non-empty array")
    for i, message in enumerate(messages):
        _need(isinstance(message, dict) and "role" in message, f"messages[{i}].role is required")
    tools = [t["function"]["name"] for t in body.get("tools") or ()]
    choice = body.get("tool_choice", "auto")
    _need(
        not ("tool_choice" in body and not tools), "'tool_choice' is only allowed when 'tools' are specified"
    )
    chosen = None
    if tools and choice != "none":
        chosen = choice["function"]["name"] if isinstance(choice, dict) else tools[0]
    last = messages[-1]
    stop = body.get("stop") or []
    return Conversation(
        texts=[_text_of(m.get("content")) for m in messages],
        last_text=_text_of(last.get("content")),
        last_is_tool_result=last["role"] == "tool",
        tools=tools,
        chosen_tool=chosen,
        max_tokens=body.get("max_tokens", body.get("max_completion_tokens")),
        stop=[stop] if isinstance(stop, str) else list(stop),
    )


def anthropic_conversation(body: Any, headers: dict[str, str]) -> Conversation:
    _need("anthropic-version" in headers, "anthropic-version: header is required")
    _need(isinstance(body, dict), "request body must be a JSON object")
    _need(isinstance(body.get("model"), str) and body["model"], "model: Field required")
    _need(isinstance(body.get("max_tokens"), int), "max_tokens: Field required")
    messages = body.get("messages")
    _need(isinstance(messages, list) and bool(messages), "messages: at least one message is required")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        _need(role in ("user", "assistant"), f"messages.{i}.role: Input should be 'user' or 'assistant'")
    tools = [t["name"] for t in body.get("tools") or ()]
    for i, tool in enumerate(body.get("tools") or ()):
        _need("input_schema" in tool, f"tools.{i}.input_schema: Field required")
    choice = body.get("tool_choice") or {"type": "auto"}
    chosen = None
    if tools and choice["type"] != "none":
        chosen = choice["name"] if choice["type"] == "tool" else tools[0]
    last = messages[-1]
    content = last.get("content")
    return Conversation(
        texts=[_text_of(body.get("system", ""))] + [_text_of(m.get("content")) for m in messages],
        last_text=_text_of(content),
        last_is_tool_result=isinstance(content, list)
        and any(isinstance(p, dict) and p.get("type") == "tool_result" for p in content),
        tools=tools,
        chosen_tool=chosen,
        max_tokens=body["max_tokens"],
        stop=list(body.get("stop_sequences") or ()),
    )


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    raw = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(dimensions // 32 + 1))
    values = [byte / 255.0 - 0.5 for byte in raw[:dimensions]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def error_body(anthropic: bool, status: int, message: str) -> bytes:
    if anthropic:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
        kind |= {429: "rate_limit_error", 529: "overloaded_error"}
        return dumps({"type": "error", "error": {"type": kind.get(status, "api_error"), "message": message}})
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_exceeded"}
    return dumps({"error": {"message": message, "type": kind.get(status, "server_error"), "code": None}})


_OPENAI_FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}
_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_calls": "tool_use",
}


def _openai_usage(reply: Reply) -> dict[str, int]:
    total = reply.prompt_tokens + reply.completion_tokens
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": total,
    }


def openai_completion(body: dict, reply: Reply, number: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.tool_name:
        function = {"name": reply.tool_name, "arguments": reply.tool_arguments}
        message["tool_calls"] = [{"id": f"call_fake_{number}", "type": "function", "function": function}]
    return {
        "id": f"chatcmpl-fake-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": _OPENAI_FINISH[reply.finish]}],
        "usage": _openai_usage(reply),
    }


def openai_events(body: dict, reply: Reply, number: int) -> list[bytes]:
    base = {"id": f"chatcmpl-fake-{number}", "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = body["model"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + dumps({**base, "choices": [choice]}) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    if reply.tool_name:
        call = {"index": 0, "id": f"call_fake_{number}", "type": "function"}
        call["function"] = {"name": reply.tool_name, "arguments": ""}
        events.append(chunk({"tool_calls": [call]}))
        half = len(reply.tool_arguments) // 2
        for part in (reply.tool_arguments[:half], reply.tool_arguments[half:]):
            events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
    events.extend(chunk({"content": piece}) for piece in reply.pieces())
    events.append(chunk({}, _OPENAI_FINISH[reply.finish]))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {**base, "choices": [], "usage": _openai_usage(reply)}
        events.append(b"data: " + dumps(usage) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_message(body: dict, reply: Reply, number: int) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
    if reply.tool_name:
        tool_input = json.loads(reply.tool_arguments)
        content.append(
            {"type": "tool_use", "id": f"toolu_fake_{number}", "name": reply.tool_name, "input": tool_input}
        )
    return {
        "id": f"msg_fake_{number}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": _ANTHROPIC_STOP[reply.finish],
        "stop_sequence": reply.stop_sequence,
        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens},
    }


def anthropic_events(body: dict, reply: Reply, number: int) -> list[bytes]:
    def event(name: str, payload: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: ".encode() + dumps({"type": name, **payload}) + b"\n\n"

    message = {
        **anthropic_message(body, reply, number),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    message["usage"] = {"input_tokens": reply.prompt_tokens, "output_tokens": 1}
    events = [event("message_start", {"message": message}), event("ping", {})]
    if reply.tool_name:
        block = {"type": "tool_use", "id": f"toolu_fake_{number}", "name": reply.tool_name, "input": {}}
        events.append(event("content_block_start", {"index": 0, "content_block": block}))
        half = len(reply.tool_arguments) // 2
        for part in (reply.tool_arguments[:half], reply.tool_arguments[half:]):
            delta = {"type": "input_json_delta", "partial_json": part}
            events.append(event("content_block_delta", {"index": 0, "delta": delta}))
    else:
        events.append(
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        )
        for piece in reply.pieces():
            delta = {"type": "text_delta", "text": piece}
            events.append(event("content_block_delta", {"index": 0, "delta": delta}))
    events.append(event("content_block_stop", {"index": 0}))
    delta = {"stop_reason": _ANTHROPIC_STOP[reply.finish], "stop_sequence": reply.stop_sequence}
    events.append(
        event("message_delta", {"delta": delta, "usage": {"output_tokens": reply.completion_tokens}})
    )
    events.append(event("message_stop", {}))
    return events
