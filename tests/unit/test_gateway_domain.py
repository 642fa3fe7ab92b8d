"""The Gateway's pure parts: request validation, cache keys, the usage outbox, the local provider's limits."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import struct

import pytest
from google.protobuf import json_format
from sophia.gateway.v1 import gateway_pb2 as pb

from libs.errors import InvalidArgument
from services.gateway.api import translate
from services.gateway.api.gateway_servicer import cache_control, header_value
from services.gateway.domain import ChatRequest, Message
from services.gateway.serving.response_cache import CacheKey, prompt_fingerprint, split_request


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


def test_the_prompt_fingerprint_depends_on_what_shapes_the_answer_only():
    base = translate.chat_request(params(temperature=0))
    same = translate.chat_request(params(temperature=0, user="someone"))
    assert prompt_fingerprint(base) == prompt_fingerprint(same)
    assert prompt_fingerprint(base) != prompt_fingerprint(
        translate.chat_request(params(temperature=0, max_tokens=5))
    )
    other = params(temperature=0, messages=[{"role": "user", "content": "hi!"}])
    assert prompt_fingerprint(base) != prompt_fingerprint(translate.chat_request(other))
    assert "hi" not in prompt_fingerprint(base) and len(prompt_fingerprint(base)) == 64


def test_the_cache_scope_is_written_as_it_always_was_so_keys_and_fingerprints_stay_the_same():
    # Sorted keys, no spaces, floats as Python writes them, text unescaped: a change here would change
    # every cache key and every fingerprint the ledger has counted so far.
    messages = [{"role": "system", "content": "Réponds en français"}, {"role": "user", "content": "Qui?"}]
    request = translate.chat_request(params(temperature=0.00001, top_p=0.5, messages=messages))
    scope, question, _ = split_request(request)
    assert question == "Qui?"
    system = {"content": "Réponds en français", "name": "", "role": "system", "tool_call_id": ""}
    history = json.dumps([{**system, "tool_calls": []}], separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(history.encode()).hexdigest()
    assert scope == (
        f'{{"frequency_penalty":null,"history":"{digest}","logit_bias":{{}},"max_tokens":null,"model":"auto",'
        '"parallel_tool_calls":null,"presence_penalty":null,"response_format":null,"routing":["",""],'
        '"seed":null,"stop":[],"temperature":1e-05,"tool_choice":null,"tools":[],"top_p":0.5}'
    )


def test_the_prompt_fingerprint_taken_from_the_cache_key_is_the_requests_own():
    request = translate.chat_request(params(temperature=0))
    scope, question, _ = split_request(request)
    key = CacheKey("t", request.model, scope, question, semantic=True)
    assert prompt_fingerprint(request, key) == prompt_fingerprint(request)


def test_who_asks_is_part_of_the_cached_question():
    """ "What is my name?" asked by alice must not be answered from what bob was told."""
    alice, bob = (
        ChatRequest(model="m", messages=(Message("user", "What is my name?", name=who),), temperature=0)
        for who in ("alice", "bob")
    )
    assert split_request(alice)[0] != split_request(bob)[0]
    assert split_request(alice) == split_request(dataclasses.replace(alice))


def _embeddings_request(body: dict) -> pb.CreateEmbeddingsRequest:
    return json_format.ParseDict({"model": "m", **body}, pb.CreateEmbeddingsRequest())


def test_embedding_inputs_and_base64_encoding():
    assert translate.embedding_inputs(_embeddings_request({"input": ["a", "b"]})).texts == ("a", "b")
    encoded = translate.embedding_value([1.0, -0.5], "base64").string_value
    assert struct.unpack("<2f", base64.b64decode(encoded)) == (1.0, -0.5)


def test_embedding_token_arrays_in_every_openai_form():
    one = translate.embedding_inputs(_embeddings_request({"input": [1, 2, 3]}))
    assert one.token_arrays == ((1, 2, 3),) and not one.texts and one.provider_input() == [[1, 2, 3]]
    many = translate.embedding_inputs(_embeddings_request({"input": [[1, 2], [3]]}))
    assert many.token_arrays == ((1, 2), (3,)) and len(many) == 2 and many.estimated_tokens() == 3
    for bad, field in (
        ({"input": [[1, 2.5]]}, r"input\[0\]"),
        ({"input": [[-1]]}, r"input\[0\]"),
        ({"input": [[]]}, r"input\[0\]"),
        ({"input": ["a", 1]}, r"input\[1\]"),
        ({"input": []}, r"^input"),
    ):
        with pytest.raises(InvalidArgument, match=field):
            translate.embedding_inputs(_embeddings_request(bad))


def test_embedding_typed_fields_are_exclusive_and_answered_typed():
    typed = translate.embedding_inputs(_embeddings_request({"texts": ["a"]}))
    assert typed.typed and typed.texts == ("a",)
    tokens = translate.embedding_inputs(_embeddings_request({"token_arrays": [{"tokens": [7, 8]}]}))
    assert tokens.typed and tokens.token_arrays == ((7, 8),)
    with pytest.raises(InvalidArgument, match=r"^texts"):
        translate.embedding_inputs(_embeddings_request({"input": "a", "texts": ["b"]}))
    with pytest.raises(InvalidArgument, match=r"texts\[1\]"):
        translate.embedding_inputs(_embeddings_request({"texts": ["a", ""]}))
    assert list(translate.embedding(0, [0.5], "float", typed=True).vector) == [0.5]
    assert not translate.embedding(0, [0.5], "float", typed=True).HasField("embedding")
    assert not translate.embedding(0, [0.5], "float", typed=False).vector


def test_typed_message_content_and_stop_sequences():
    text = translate.chat_request(params(messages=[{"role": "user", "text": "hi"}], stop_sequences=["x"]))
    parts = translate.chat_request(
        params(messages=[{"role": "user", "parts": [{"type": "text", "text": "hi"}]}], stop=["x"])
    )
    assert text.messages == parts.messages and text.messages[0].content == "hi"
    assert text.stop == parts.stop == ("x",)
    with pytest.raises(InvalidArgument, match=r"messages\[0\]\.text"):
        translate.chat_request(params(messages=[{"role": "user", "content": "a", "text": "b"}]))
    with pytest.raises(InvalidArgument, match=r"messages\[0\]\.parts\[0\]"):
        translate.chat_request(params(messages=[{"role": "user", "parts": [{"type": "image_url"}]}]))
    with pytest.raises(InvalidArgument, match=r"^stop_sequences"):
        translate.chat_request(params(stop="a", stop_sequences=["b"]))
    with pytest.raises(InvalidArgument, match=r"^stop_sequences"):
        translate.chat_request(params(stop_sequences=["1", "2", "3", "4", "5"]))


def test_cache_control_directives_anywhere_in_the_header():
    assert "no-cache" in cache_control([("cache-control", "max-age=0, No-Cache")])
    assert cache_control([("cache-control", "no-store")]) == {"no-store"}
    assert not {"no-cache", "no-store"} & cache_control([("cache-control", "max-age=60")])


def test_no_store_looks_up_but_does_not_store():
    request = translate.chat_request(params(temperature=0), no_store=True)
    assert request.use_cache and not request.store_in_cache


def test_header_values_are_ascii_and_bounded():
    assert (
        header_value("balanced: simple prompt → cheapest model")
        == "balanced: simple prompt -> cheapest model"
    )
    assert header_value("é" + "x" * 300, limit=10) == "xxxxxxxxx~"
