"""OpenAI-shaped protobuf messages ⇄ the Gateway's domain objects, validating every field on the way in.

Every refusal names the field the way the client wrote it (e.g. `messages[2].role`), so that the edge's
400 tells an SDK user exactly what to fix.
"""

from __future__ import annotations

import base64
import re
import struct
from typing import Any

from google.protobuf import json_format, struct_pb2
from sophia.gateway.v1 import gateway_pb2 as pb

from libs.config import Config
from libs.errors import InvalidArgument, shown
from services.gateway.domain import ChatRequest, Completion, CompletionChunk, EmbeddingInputs, Message

ROLES = ("system", "developer", "user", "assistant", "tool")
PREFERENCES = ("fast", "quality", "code", "balanced")
TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_MESSAGES = 2048
MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 256
MAX_TOKEN_ID = 2**31 - 1
# A client's task type goes into the usage record, which the cost ledger refuses past 64 characters
# (services/ledger/usage.py), and back out in the x-sophia-task-type header: refused here, before anything
# is answered, instead of answered and never billed. The characters are those of labels like the
# classifier's task types ("summarization", "data_analysis").
MAX_TASK_TYPE_CHARS = 64
_TASK_TYPE = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_TASK_TYPE_CHARS}}}")


def _value(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as plain Python; None when unset or JSON null."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":  # most message contents: MessageToDict costs ten times as much
        return value.string_value
    if kind in (None, "null_value"):
        return None
    return json_format.MessageToDict(value)


def _in_range(field: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidArgument(field, f"must be between {low:g} and {high:g}, got {value:g}")


def _content(field: str, content: Any, role: str, has_tool_calls: bool) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant" and has_tool_calls:
            return ""
        raise InvalidArgument(field, "is required")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidArgument(
                    f"{field}[{j}]", "only {'type': 'text', 'text': '...'} parts are supported"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidArgument(field, "must be a string or a list of text parts")


def _typed_content(field: str, message: pb.ChatMessage) -> tuple[str, Any]:
    """The content's field name and value, from whichever of `content` (REST), `text` or `parts` (gRPC)
    is set."""
    given = [
        name
        for name, present in (
            ("content", message.content.WhichOneof("kind") not in (None, "null_value")),
            ("text", bool(message.text)),
            ("parts", bool(message.parts)),
        )
        if present
    ]
    if len(given) > 1:
        raise InvalidArgument(f"{field}.{given[1]}", f"set only one of {' / '.join(given)}")
    if message.text:
        return "text", message.text
    if message.parts:
        return "parts", [{"type": part.type, "text": part.text} for part in message.parts]
    return "content", _value(message.content)


def _message(i: int, message: pb.ChatMessage) -> Message:
    field = f"messages[{i}]"
    if message.role not in ROLES:
        raise InvalidArgument(
            f"{field}.role", f"must be one of {', '.join(ROLES)}; got {shown(message.role)}"
        )
    tool_calls = tuple(
        json_format.MessageToDict(call, preserving_proto_field_name=True) for call in message.tool_calls
    )
    if tool_calls and message.role != "assistant":
        raise InvalidArgument(f"{field}.tool_calls", "only assistant messages carry tool calls")
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidArgument(f"{field}.tool_call_id", "is required for tool messages")
    name, content = _typed_content(field, message)
    return Message(
        role="system" if message.role == "developer" else message.role,
        content=_content(f"{field}.{name}", content, message.role, bool(tool_calls)),
        name=message.name,
        tool_call_id=message.tool_call_id,
        tool_calls=tool_calls,
    )


def _stop(params: pb.ChatCompletionParams) -> tuple[str, ...]:
    value = _value(params.stop)
    if value is not None and params.stop_sequences:
        raise InvalidArgument("stop_sequences", "set only one of stop / stop_sequences")
    field = "stop_sequences" if params.stop_sequences else "stop"
    if params.stop_sequences:
        value = list(params.stop_sequences)
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise InvalidArgument(
            field, f"must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them"
        )
    return tuple(stops)


def _tool_choice(value: Any) -> Any:
    if value is None or value in TOOL_CHOICES:
        return value
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and (value.get("function") or {}).get("name")
    ):
        return value
    raise InvalidArgument(
        "tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def _tools(tools) -> tuple[dict[str, Any], ...]:
    result = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise InvalidArgument(f"tools[{i}].type", "must be 'function'")
        if not tool.function.name:
            raise InvalidArgument(f"tools[{i}].function.name", "is required")
        result.append(json_format.MessageToDict(tool, preserving_proto_field_name=True))
    return tuple(result)


def _max_tokens(params: pb.ChatCompletionParams) -> int | None:
    limits = []
    for field in ("max_tokens", "max_completion_tokens"):
        if params.HasField(field):
            value = getattr(params, field)
            if value < 1:
                raise InvalidArgument(field, f"must be at least 1, got {value}")
            limits.append(value)
    return min(limits) if limits else None


def _refuse_unsupported(params: pb.ChatCompletionParams) -> None:
    if params.HasField("n") and params.n != 1:
        raise InvalidArgument("n", "only n = 1 is supported; send separate requests for more choices")
    if params.logprobs or params.HasField("top_logprobs"):
        raise InvalidArgument(
            "logprobs" if params.logprobs else "top_logprobs", "log probabilities are not supported"
        )
    if any(modality != "text" for modality in params.modalities):
        raise InvalidArgument("modalities", "only 'text' is supported")
    if params.reasoning_effort:
        raise InvalidArgument("reasoning_effort", "reasoning models are not served by this gateway yet")
    if params.verbosity:
        raise InvalidArgument("verbosity", "not supported by the models this gateway serves")


def chat_request(
    params: pb.ChatCompletionParams, *, cache_header_off: bool = False, no_store: bool = False
) -> ChatRequest:
    """Validates the body of POST /v1/chat/completions and returns the domain request."""
    if not params.model:
        raise InvalidArgument("model", "is required (a model id from /v1/models, or 'auto')")
    if not params.messages:
        raise InvalidArgument("messages", "must contain at least one message")
    if len(params.messages) > MAX_MESSAGES:
        raise InvalidArgument("messages", f"at most {MAX_MESSAGES} messages")
    _refuse_unsupported(params)
    optional = {
        name: getattr(params, name) if params.HasField(name) else None
        for name in (
            "temperature",
            "top_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "parallel_tool_calls",
        )
    }
    _in_range("temperature", optional["temperature"], 0.0, 2.0)
    _in_range("top_p", optional["top_p"], 0.0, 1.0)
    if optional["top_p"] == 0.0:
        raise InvalidArgument("top_p", "must be greater than 0")
    _in_range("presence_penalty", optional["presence_penalty"], -2.0, 2.0)
    _in_range("frequency_penalty", optional["frequency_penalty"], -2.0, 2.0)
    for token, bias in params.logit_bias.items():
        _in_range(f"logit_bias[{token}]", bias, -100, 100)
    if params.model_preference and params.model_preference not in PREFERENCES:
        raise InvalidArgument("model_preference", f"must be one of {', '.join(PREFERENCES)}")
    if params.task_type and not _TASK_TYPE.fullmatch(params.task_type):
        raise InvalidArgument(
            "task_type",
            f"must be at most {MAX_TASK_TYPE_CHARS} characters of A-Z a-z 0-9 . _ : -; "
            f"got {shown(params.task_type)}",
        )
    response_format = None
    if params.HasField("response_format"):
        if params.response_format.type not in RESPONSE_FORMATS:
            raise InvalidArgument("response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}")
        response_format = json_format.MessageToDict(params.response_format, preserving_proto_field_name=True)
    return ChatRequest(
        model=params.model,
        messages=tuple(_message(i, message) for i, message in enumerate(params.messages)),
        max_tokens=_max_tokens(params),
        temperature=optional["temperature"],
        top_p=optional["top_p"],
        stop=_stop(params),
        seed=optional["seed"],
        presence_penalty=optional["presence_penalty"],
        frequency_penalty=optional["frequency_penalty"],
        logit_bias=dict(params.logit_bias),
        user=params.user,
        tools=_tools(params.tools),
        tool_choice=_tool_choice(_value(params.tool_choice)),
        parallel_tool_calls=optional["parallel_tool_calls"],
        response_format=response_format,
        include_usage=params.stream_options.include_usage,
        use_cache=not cache_header_off and (params.cache if params.HasField("cache") else True),
        store_in_cache=not no_store,
        task_type=params.task_type,
        model_preference=params.model_preference,
    )


def _tool_call_messages(tool_calls) -> list[pb.ToolCall]:
    return [json_format.ParseDict(call, pb.ToolCall(), ignore_unknown_fields=True) for call in tool_calls]


def completion_response(
    completion_id: str, created: int, model: str, completion: Completion
) -> pb.CreateChatCompletionResponse:
    return pb.CreateChatCompletionResponse(
        id=completion_id,
        object="chat.completion",
        created=created,
        model=model,
        choices=[
            pb.Choice(
                index=0,
                message=pb.AssistantMessage(
                    role="assistant",
                    # OpenAI's content is null beside tool calls: absent here, "" only for an empty answer.
                    content=completion.text if completion.text or not completion.tool_calls else None,
                    tool_calls=_tool_call_messages(completion.tool_calls),
                ),
                finish_reason=completion.finish_reason,
            )
        ],
        usage=usage(completion.prompt_tokens, completion.completion_tokens),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def chunk_response(
    completion_id: str, created: int, model: str, chunk: CompletionChunk | None, *, first: bool = False
) -> pb.StreamChatCompletionResponse:
    """One chat.completion.chunk; `chunk=None` with first=True is the opening role-only chunk."""
    choice = pb.ChunkChoice(index=0)
    delta = choice.delta  # edited in place: protobuf copies sub-messages passed to constructors
    if first:
        delta.role = "assistant"
        delta.content = ""
    if chunk is not None:
        if chunk.text:
            delta.content = chunk.text
        delta.tool_calls.extend(_tool_call_messages(chunk.tool_calls))
        if chunk.finish_reason is not None:
            choice.finish_reason = chunk.finish_reason
    return pb.StreamChatCompletionResponse(
        id=completion_id, object="chat.completion.chunk", created=created, model=model, choices=[choice]
    )


def _token_array(field: str, value: Any) -> tuple[int, ...]:
    # JSON numbers arrive as floats in a google.protobuf.Value.
    if not isinstance(value, list) or not value:
        raise InvalidArgument(field, "must be a non-empty list of token ids")
    if not all(isinstance(t, (int, float)) and t == int(t) and 0 <= t <= MAX_TOKEN_ID for t in value):
        raise InvalidArgument(field, f"token ids must be integers from 0 to {MAX_TOKEN_ID}")
    return tuple(int(t) for t in value)


def _rest_embedding_inputs(value: Any) -> EmbeddingInputs:
    """OpenAI's `input`: a string, a list of strings, one token array, or a list of token arrays."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidArgument(
            "input", "must be a non-empty string, list of strings, token array or list of token arrays"
        )
    if all(isinstance(item, (int, float)) for item in value):
        return EmbeddingInputs(texts=(), token_arrays=(_token_array("input", value),), typed=False)
    if all(isinstance(item, list) for item in value):
        arrays = tuple(_token_array(f"input[{i}]", item) for i, item in enumerate(value))
        return EmbeddingInputs(texts=(), token_arrays=arrays, typed=False)
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise InvalidArgument(f"input[{i}]", "must be a string like the other items")
    return EmbeddingInputs(texts=tuple(value), token_arrays=(), typed=False)


def embedding_inputs(request: pb.CreateEmbeddingsRequest) -> EmbeddingInputs:
    """The inputs from `input` (REST) or `texts` / `token_arrays` (gRPC); exactly one may be set."""
    given = [
        name
        for name, present in (
            ("input", request.input.WhichOneof("kind") not in (None, "null_value")),
            ("texts", bool(request.texts)),
            ("token_arrays", bool(request.token_arrays)),
        )
        if present
    ]
    if not given:
        raise InvalidArgument("input", "is required (or texts / token_arrays over gRPC)")
    if len(given) > 1:
        raise InvalidArgument(given[1], f"set only one of {' / '.join(given)}")
    if request.texts:
        inputs = EmbeddingInputs(texts=tuple(request.texts), token_arrays=(), typed=True)
    elif request.token_arrays:
        arrays = tuple(
            _token_array(f"token_arrays[{i}].tokens", list(array.tokens))
            for i, array in enumerate(request.token_arrays)
        )
        inputs = EmbeddingInputs(texts=(), token_arrays=arrays, typed=True)
    else:
        inputs = _rest_embedding_inputs(_value(request.input))
    field = given[0]
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidArgument(field, f"at most {MAX_EMBEDDING_INPUTS} items per request")
    for i, text in enumerate(inputs.texts):
        if not text:
            raise InvalidArgument(f"{field}[{i}]", "must not be empty")
    return inputs


def encoding_format(request: pb.CreateEmbeddingsRequest) -> str:
    if request.encoding_format not in ("", "float", "base64"):
        raise InvalidArgument("encoding_format", "must be 'float' or 'base64'")
    return request.encoding_format or "float"


def embedding(index: int, vector: list[float], fmt: str, typed: bool) -> pb.Embedding:
    """Typed in, typed out: `vector` for a request that used texts / token_arrays, else OpenAI's value."""
    if typed:
        return pb.Embedding(object="embedding", index=index, vector=vector)
    return pb.Embedding(object="embedding", index=index, embedding=embedding_value(vector, fmt))


def embedding_value(vector: list[float], fmt: str) -> struct_pb2.Value:
    if fmt == "base64":
        # OpenAI's base64 form: the little-endian float32 bytes of the vector.
        return struct_pb2.Value(
            string_value=base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        )
    listed = struct_pb2.Value()
    listed.list_value.values.extend(struct_pb2.Value(number_value=x) for x in vector)
    return listed


AUTO_MODEL = "auto"
AUTO_DESCRIPTION = (
    "Sophia chooses the model per request: a task_type rule when the request names one, else its "
    "model_preference (fast: lowest live latency; quality: the best; code: the code chain; balanced, the "
    "default: the prompt is classified by task type and difficulty, simple prompts go to the cheapest "
    "capable model and complex ones to the quality chain). Models must fit the request (context window, "
    "tools, response_format), be enabled for the tenant and not have an open circuit breaker; each plan "
    "falls back along its models in order. routes_to lists every model a plan may use."
)


def _auto_routes(config: Config) -> list[str]:
    """Every enabled chat model: balanced and quality plans rank all of them by price and quality."""
    return [model_id for model_id, model in config.models.items() if model.enabled and model.kind == "chat"]


def model_catalog(config: Config, created: int) -> list[pb.Model]:
    """GET /v1/models: "auto" first (what it means and where it may route), then every enabled model."""
    auto = pb.Model(
        id=AUTO_MODEL,
        object="model",
        created=created,
        owned_by="sophia",
        kind="chat",
        description=AUTO_DESCRIPTION,
        routes_to=_auto_routes(config),
    )
    return [auto] + [
        pb.Model(
            id=model_id,
            object="model",
            created=created,
            owned_by=model.owned_by or model.provider,
            kind=model.kind,
            context_window=model.context_window,
        )
        for model_id, model in config.models.items()
        if model.enabled
    ]
