"""The Gateway's pure parts: request validation, cache keys, the usage outbox, the local provider's limits."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from google.protobuf import json_format
from sophia.gateway.v1 import gateway_pb2 as pb

from libs.errors import InvalidArgument
from services.gateway import translate
from services.gateway.caching import request_key
from services.gateway.servicer import cache_disabled_by_header


def params(**body) -> pb.ChatCompletionParams:
    body.setdefault("model", "auto")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return json_format.ParseDict(body, pb.ChatCompletionParams())


def test_a_full_openai_request_translates():
    request = translate.chat_request(
        params(
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            max_tokens=50,
            max_completion_tokens=20,
            temperature=0.2,
            stop="END",
            seed=7,
            stream_options={"include_usage": True},
            user="u1",
            metadata={"team": "x"},
            cache=False,
        )
    )
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "a\nb")]
    assert request.max_tokens == 20
    assert request.stop == ("END",)
    assert request.seed == 7
    assert request.include_usage and not request.use_cache


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"model": ""}, "model"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"50256": 101}}, "logit_bias[50256]"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"model_preference": "cheap"}, "model_preference"),
    ],
)
def test_invalid_requests_name_the_field(body, field):
    with pytest.raises(InvalidArgument) as raised:
        translate.chat_request(params(**body))
    assert raised.value.field == field


def test_cache_control_header_opts_out():
    assert not translate.chat_request(params(), cache_header_off=True).use_cache


def test_cache_key_depends_on_what_shapes_the_answer_only():
    base = translate.chat_request(params(temperature=0))
    assert request_key(base) == request_key(translate.chat_request(params(temperature=0, user="someone")))
    assert request_key(base) != request_key(translate.chat_request(params(temperature=0, max_tokens=5)))
    other = params(temperature=0, messages=[{"role": "user", "content": "hi!"}])
    assert request_key(base) != request_key(translate.chat_request(other))
    assert json.loads(request_key(base))["messages"][0]["content"] == "hi"


def test_embedding_inputs_and_base64_encoding():
    request = json_format.ParseDict({"model": "m", "input": ["a", "b"]}, pb.CreateEmbeddingsRequest())
    assert translate.embedding_inputs(request) == ["a", "b"]
    tokens = json_format.ParseDict({"model": "m", "input": [[1, 2]]}, pb.CreateEmbeddingsRequest())
    with pytest.raises(InvalidArgument, match=r"input\[0\]"):
        translate.embedding_inputs(tokens)
    encoded = translate.embedding_value([1.0, -0.5], "base64").string_value
    assert struct.unpack("<2f", base64.b64decode(encoded)) == (1.0, -0.5)


def test_cache_control_directives_anywhere_in_the_header():
    assert cache_disabled_by_header([("cache-control", "max-age=0, No-Cache")])
    assert cache_disabled_by_header([("cache-control", "no-store")])
    assert not cache_disabled_by_header([("cache-control", "max-age=60")])
