"""The OpenAI and Anthropic adapters against a real HTTP server speaking both wire formats (tests.fakes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from libs import deadline
from libs.config import ProviderConfig
from services.gateway.domain import ChatRequest, CompletionChunk, Message, Target
from services.gateway.providers.anthropic import AnthropicProvider
from services.gateway.providers.base import ProviderCall, ProviderError, current_call
from services.gateway.providers.http import (
    MAX_PROVIDER_MESSAGE_CHARS,
    HttpProvider,
    sanitise_provider_message,
)
from services.gateway.providers.openai import OpenAICompatibleProvider
from tests.fakes.provider import FakeProvider
from tests.support import free_port

KEY_ENV = "SOPHIA_TEST_PROVIDER_KEY"
# Not shaped like a key, so only the adapter's knowledge of its own key can keep it out of messages.
CANARY_KEY = "canary-7Hq2xLw9"
TARGET = Target(model_id="test-model", provider="fake", provider_model="fake-model-v1")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def ask(text: str, **options) -> ChatRequest:
    return ChatRequest(model="test-model", messages=(Message("user", text),), **options)


@pytest.fixture(scope="module")
def fake() -> FakeProvider:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, CANARY_KEY)
    return CANARY_KEY


def make(kind: str, base_url: str, timeout_seconds: float = 5.0) -> HttpProvider:
    config = ProviderConfig(
        type=kind, base_url=base_url, api_key_env=KEY_ENV, timeout_seconds=timeout_seconds
    )
    return OpenAICompatibleProvider("fake", config) if kind == "openai" else AnthropicProvider("fake", config)


def base_url(fake: FakeProvider, kind: str) -> str:
    return fake.openai_base_url if kind == "openai" else fake.anthropic_base_url


@pytest.fixture
async def openai(fake: FakeProvider, key: str) -> AsyncIterator[OpenAICompatibleProvider]:
    provider = make("openai", fake.openai_base_url)
    yield provider
    await provider.close()


@pytest.fixture
async def anthropic(fake: FakeProvider, key: str) -> AsyncIterator[AnthropicProvider]:
    provider = make("anthropic", fake.anthropic_base_url)
    yield provider
    await provider.close()


@pytest.fixture(params=["openai", "anthropic"])
async def provider(
    request: pytest.FixtureRequest, fake: FakeProvider, key: str
) -> AsyncIterator[HttpProvider]:
    provider = make(request.param, base_url(fake, request.param))
    yield provider
    await provider.close()


async def collect(
    chunks: AsyncIterator[CompletionChunk],
) -> tuple[list[CompletionChunk], ProviderError | None]:
    received = []
    try:
        async for chunk in chunks:
            received.append(chunk)
    except ProviderError as error:
        return received, error
    return received, None


def assert_safe(error: BaseException, fake: FakeProvider) -> None:
    """Nothing secret or internal in the error, its repr or its whole traceback."""
    for text in (str(error), repr(error), "".join(traceback.format_exception(error))):
        assert CANARY_KEY not in text
        assert fake.url not in text and str(fake.port) not in text


def merge_tool_call_deltas(chunks: list[CompletionChunk]) -> dict:
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.tool_calls:
            call = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.get("id", call["id"])
            function = delta.get("function", {})
            call["name"] = function.get("name", call["name"])
            call["arguments"] += function.get("arguments", "")
    return calls


# --- OpenAI-compatible -------------------------------------------------------------------------------


async def test_openai_unary_sends_the_key_and_only_the_fields_set(openai, fake):
    request = ChatRequest(
        model="test-model",
        messages=(Message("system", "be brief"), Message("user", "hello there world", name="ann")),
        max_tokens=50,
        temperature=0.2,
        stop=("zzz",),
        seed=7,
        user="end-user-1",
    )
    completion = await openai.complete(TARGET, request)

    assert (completion.text, completion.finish_reason) == ("hello there world", "stop")
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 3)
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {CANARY_KEY}"
    assert sent.body == {
        "model": "fake-model-v1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world", "name": "ann"},
        ],
        "max_tokens": 50,
        "temperature": 0.2,
        "seed": 7,
        "stop": ["zzz"],
        "user": "end-user-1",
    }


async def test_openai_finish_reasons(openai):
    cut = await openai.complete(TARGET, ask("one two three four", max_tokens=2))
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("one two", "length", 2)
    stopped = await openai.complete(TARGET, ask("one two three four", stop=("three",)))
    assert (stopped.text, stopped.finish_reason) == ("one two", "stop")


async def test_openai_stream_yields_deltas_then_finish_and_usage(openai, fake):
    chunks, error = await collect(openai.stream(TARGET, ask("streaming is fun", max_tokens=100)))

    assert error is None
    assert "".join(c.text for c in chunks) == "streaming is fun"
    assert len(chunks) == 4  # one per word, then the final chunk
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert (chunks[-1].finish_reason, chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (
        "stop",
        3,
        3,
    )
    sent = fake.requests[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_openai_tool_call_round_trip(openai, fake):
    request = ask("weather in Paris", tools=(WEATHER_TOOL,), tool_choice="auto", parallel_tool_calls=False)
    completion = await openai.complete(TARGET, request)

    assert completion.finish_reason == "tool_calls"
    (call,) = completion.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"query": "weather in Paris"}
    sent = fake.requests[-1].body
    assert sent["tools"] == [WEATHER_TOOL]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("auto", False)

    follow_up = ChatRequest(
        model="test-model",
        messages=(
            *request.messages,
            Message("assistant", "", tool_calls=completion.tool_calls),
            Message("tool", "sunny and 21C", tool_call_id=call["id"]),
        ),
        tools=(WEATHER_TOOL,),
    )
    answer = await openai.complete(TARGET, follow_up)

    assert (answer.text, answer.finish_reason) == ("tool result: sunny and 21C", "stop")
    assistant, tool = fake.requests[-1].body["messages"][-2:]
    assert assistant == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert tool == {"role": "tool", "content": "sunny and 21C", "tool_call_id": call["id"]}


async def test_openai_stream_passes_tool_call_deltas_through(openai):
    chunks, error = await collect(openai.stream(TARGET, ask("weather in Oslo", tools=(WEATHER_TOOL,))))

    assert error is None
    (call,) = merge_tool_call_deltas(chunks).values()
    assert call["id"] and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"query": "weather in Oslo"}
    assert chunks[-1].finish_reason == "tool_calls"


async def test_openai_embeddings(openai, fake):
    vectors, prompt_tokens = await openai.embed(TARGET, ["red apple", "green"])
    again, _ = await openai.embed(TARGET, ["green"])

    assert len(vectors) == 2 and all(len(v) == 16 for v in vectors)
    assert prompt_tokens == 3
    assert again[0] == vectors[1] and vectors[0] != vectors[1]
    assert fake.requests[-1].path == "/v1/embeddings"
    assert fake.requests[-1].body == {"model": "fake-model-v1", "input": ["green"]}


async def test_openai_supports_every_modelled_feature(openai):
    request = ask("x", logit_bias={"50256": -100}, seed=1, presence_penalty=0.5, frequency_penalty=0.5)
    assert openai.unsupported(request) is None


# --- Anthropic ----------------------------------------------------------------------------------------


async def test_anthropic_unary_translates_request_and_reply(anthropic, fake):
    request = ChatRequest(
        model="test-model",
        messages=(Message("system", "be brief"), Message("user", "hello there world")),
        temperature=0.5,
        stop=("zzz",),
        user="end-user-1",
    )
    completion = await anthropic.complete(TARGET, request)

    assert (completion.text, completion.finish_reason) == ("hello there world", "stop")
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 3)
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == CANARY_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body == {
        "model": "fake-model-v1",
        "max_tokens": 1024,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hello there world"}],
        "temperature": 0.5,
        "stop_sequences": ["zzz"],
        "metadata": {"user_id": "end-user-1"},
    }


async def test_anthropic_stop_reasons_map_to_openai_finish_reasons(anthropic):
    cut = await anthropic.complete(TARGET, ask("one two three four", max_tokens=2))
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("one two", "length", 2)
    stopped = await anthropic.complete(TARGET, ask("one two three four", stop=("three",)))
    assert (stopped.text, stopped.finish_reason) == ("one two", "stop")


async def test_anthropic_stream_yields_deltas_then_finish_and_usage(anthropic, fake):
    chunks, error = await collect(anthropic.stream(TARGET, ask("streaming is fun", max_tokens=2)))

    assert error is None
    assert "".join(c.text for c in chunks) == "streaming is"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert (chunks[-1].finish_reason, chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (
        "length",
        3,
        2,
    )
    assert fake.requests[-1].body["stream"] is True


async def test_anthropic_tool_call_round_trip(anthropic, fake):
    named = {"type": "function", "function": {"name": "get_weather"}}
    request = ask("weather in Paris", tools=(WEATHER_TOOL,), tool_choice=named, parallel_tool_calls=False)
    completion = await anthropic.complete(TARGET, request)

    assert completion.finish_reason == "tool_calls"
    (call,) = completion.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"query": "weather in Paris"}
    sent = fake.requests[-1].body
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}

    follow_up = ChatRequest(
        model="test-model",
        messages=(
            *request.messages,
            Message("assistant", "", tool_calls=completion.tool_calls),
            Message("tool", "sunny and 21C", tool_call_id=call["id"]),
        ),
        tools=(WEATHER_TOOL,),
    )
    answer = await anthropic.complete(TARGET, follow_up)

    assert (answer.text, answer.finish_reason) == ("tool result: sunny and 21C", "stop")
    assistant, tool_result = fake.requests[-1].body["messages"][-2:]
    assert assistant == {
        "role": "assistant",
        "content": [
            {
                "type": "tool_use",
                "id": call["id"],
                "name": "get_weather",
                "input": {"query": "weather in Paris"},
            }
        ],
    }
    assert tool_result == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny and 21C"}],
    }


async def test_anthropic_stream_turns_tool_use_into_openai_tool_call_deltas(anthropic):
    chunks, error = await collect(anthropic.stream(TARGET, ask("weather in Oslo", tools=(WEATHER_TOOL,))))

    assert error is None
    (call,) = merge_tool_call_deltas(chunks).values()
    assert call["id"] and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"query": "weather in Oslo"}
    assert chunks[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"seed": 3}, "seed"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"temperature": 1.5}, "temperature"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
async def test_anthropic_names_the_features_it_cannot_honour(anthropic, options, field):
    assert anthropic.unsupported(ask("x", **options))[0] == field
    assert anthropic.unsupported(ask("x", temperature=0.7, stop=("a",), tools=(WEATHER_TOOL,))) is None


async def test_anthropic_has_no_embeddings(anthropic):
    with pytest.raises(ProviderError) as caught:
        await anthropic.embed(TARGET, ["x"])
    assert not caught.value.retryable


# --- failures, both formats --------------------------------------------------------------------------

FAULTS = [
    ("status:500", True, "UNAVAILABLE", "http_500"),
    ("status:429", True, "UNAVAILABLE", "http_429"),
    ("status:400", False, "INVALID_ARGUMENT", "http_400"),
    ("status:401", False, "FAILED_PRECONDITION", "http_401"),
    ("malformed", True, "UNAVAILABLE", "bad_response"),
    ("drop_midstream", True, "UNAVAILABLE", "dropped"),
]


@pytest.mark.parametrize(("fault", "retryable", "status", "kind"), FAULTS)
async def test_unary_failures_are_classified(provider, fake, fault, retryable, status, kind):
    with pytest.raises(ProviderError) as caught:
        await provider.complete(TARGET, ask(f"please fail fault={fault}"))

    error = caught.value
    assert (error.retryable, error.status, error.kind) == (retryable, status, kind)
    assert_safe(error, fake)


@pytest.mark.parametrize(("fault", "retryable", "status", "kind"), FAULTS)
async def test_stream_failures_are_classified(provider, fake, fault, retryable, status, kind):
    chunks, error = await collect(provider.stream(TARGET, ask(f"please fail now fault={fault}")))

    assert error is not None
    assert (error.retryable, error.status, error.kind) == (retryable, status, kind)
    if fault.startswith("status:"):
        assert chunks == []  # refused before the first chunk: the caller may still fall back
    if fault == "drop_midstream":
        assert chunks and chunks[-1].finish_reason is None
    assert_safe(error, fake)


async def test_a_rejected_key_echoed_by_the_provider_is_redacted(provider, fake):
    with pytest.raises(ProviderError) as caught:
        await provider.complete(TARGET, ask("fault=status:401"))

    # The provider's message comes through (it helps an operator), without the key it quoted.
    assert "Incorrect API key provided: [redacted]" in caught.value.message
    assert_safe(caught.value, fake)


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_hung_provider_fails_at_the_callers_deadline(provider, fake, streaming):
    token = deadline.start(0.3)
    started = time.monotonic()
    try:
        if streaming:
            chunks, error = await collect(provider.stream(TARGET, ask("fault=hang")))
            assert chunks == []
        else:
            with pytest.raises(ProviderError) as caught:
                await provider.complete(TARGET, ask("fault=hang"))
            error = caught.value
    finally:
        deadline.reset(token)

    elapsed = time.monotonic() - started
    assert 0.2 < elapsed < 0.6  # the fake would hang forever
    # The caller's own deadline: not held against the provider, and no other target is worth trying.
    assert (error.kind, error.status, error.retryable) == ("deadline", "DEADLINE_EXCEEDED", False)


async def test_a_stream_that_stalls_midway_fails_at_the_callers_deadline(provider, fake):
    token = deadline.start(0.3)
    started = time.monotonic()
    try:
        chunks, error = await collect(
            provider.stream(TARGET, ask("alpha beta gamma delta fault=hang_midstream"))
        )
    finally:
        deadline.reset(token)

    assert time.monotonic() - started < 0.6
    assert chunks and chunks[0].text
    assert error is not None and error.kind == "deadline" and not error.retryable


async def test_the_configured_timeout_caps_a_call_without_a_deadline(fake, key):
    provider = make("openai", fake.openai_base_url, timeout_seconds=0.2)
    started = time.monotonic()
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(TARGET, ask("fault=latency:2"))
    finally:
        await provider.close()
    assert time.monotonic() - started < 1.0
    assert caught.value.kind == "timeout"


async def test_the_providers_own_limit_is_held_against_it_under_a_longer_deadline(fake, key):
    provider = make("openai", fake.openai_base_url, timeout_seconds=0.2)
    token = deadline.start(5.0)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(TARGET, ask("fault=latency:2"))
    finally:
        deadline.reset(token)
        await provider.close()
    assert (caught.value.kind, caught.value.retryable) == ("timeout", True)


async def test_a_passed_deadline_sends_nothing(provider, fake):
    before = len(fake.requests)
    token = deadline.start(0.01)
    try:
        await asyncio.sleep(0.05)
        with pytest.raises(ProviderError) as caught:
            await provider.complete(TARGET, ask("too late"))
    finally:
        deadline.reset(token)
    assert caught.value.kind == "deadline"
    assert len(fake.requests) == before


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_an_unreachable_provider_is_retryable(key, kind):
    provider = make(kind, f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(TARGET, ask("anyone there?"))
        chunks, error = await collect(provider.stream(TARGET, ask("anyone there?")))
    finally:
        await provider.close()
    assert (caught.value.kind, caught.value.retryable) == ("connect", True)
    assert chunks == [] and error is not None and error.kind == "connect"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_missing_key_fails_every_call_without_sending_it(fake, monkeypatch, kind):
    monkeypatch.delenv(KEY_ENV, raising=False)
    provider = make(kind, base_url(fake, kind))  # constructing still works: the Gateway starts regardless
    before = len(fake.requests)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(TARGET, ask("hello"))
        chunks, stream_error = await collect(provider.stream(TARGET, ask("hello")))
    finally:
        await provider.close()

    assert caught.value.message == (
        f"provider fake has no API key configured (set environment variable {KEY_ENV})"
    )
    assert (caught.value.retryable, caught.value.status) == (False, "FAILED_PRECONDITION")
    assert chunks == [] and stream_error is not None and not stream_error.retryable
    assert len(fake.requests) == before


async def test_connections_are_reused_across_unary_and_streamed_calls(provider, fake):
    before = fake.connections_accepted
    for _ in range(3):
        await provider.complete(TARGET, ask("again and again"))
        chunks, error = await collect(provider.stream(TARGET, ask("again and again")))
        assert error is None and chunks[-1].finish_reason == "stop"
    assert fake.connections_accepted - before == 1


def test_provider_messages_are_cut_short_and_stripped_of_secrets():
    long_token = "x" * 40
    message = sanitise_provider_message(
        f"bad\nrequest {long_token} my-secret " + "words " * 100, ["my-secret"]
    )

    assert len(message) <= MAX_PROVIDER_MESSAGE_CHARS and message.endswith("...")
    assert message.startswith("bad request [redacted] [redacted] words")


def test_the_fake_runs_as_a_process():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.provider", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        url = process.stdout.readline().split()[-1]
        assert httpx.get(f"{url}/health", timeout=5).text == "ok"
        models = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer k"}, timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["fake-gpt", "fake-claude", "fake-embedding"]
    finally:
        process.terminate()
        assert process.wait(timeout=5) == 0


@pytest.mark.parametrize(("wait_first", "sent"), [(False, True), (True, False)])
async def test_a_call_cut_by_the_deadline_says_whether_the_provider_was_sent_it(
    provider, fake, wait_first, sent
):
    """Sent, the provider bills the prompt (the flow bills the tenant for it); a deadline already passed
    sends nothing."""
    call = ProviderCall()
    marked = current_call.set(call)
    token = deadline.start(0.3 if not wait_first else 0.01)
    try:
        if wait_first:
            await asyncio.sleep(0.05)
        with pytest.raises(ProviderError) as caught:
            await provider.complete(TARGET, ask("fault=hang"))
    finally:
        deadline.reset(token)
        current_call.reset(marked)
    assert (caught.value.kind, call.sent) == ("deadline", sent)
