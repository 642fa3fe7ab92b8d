"""Usage a provider did not count is billed for conservative estimates, never as free: answers and
embeddings that come without usage, and the prompt of a stream cut before its usage arrived, tools and
tool calls included."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from sophia.inference.v1 import inference_pb2 as pb

from libs.config import ProviderConfig
from services.gateway.domain import (
    ESTIMATE_CHARS_PER_TOKEN,
    ChatRequest,
    CompletionChunk,
    Message,
    StreamTally,
    Target,
    estimated_prompt_tokens,
)
from services.gateway.providers.anthropic import AnthropicProvider, _StreamState
from services.gateway.providers.http import HttpProvider
from services.gateway.providers.local import LocalProvider
from services.gateway.providers.openai import OpenAICompatibleProvider
from tests.fakes.provider import FakeProvider

KEY_ENV = "SOPHIA_TEST_PROVIDER_KEY"
TARGET = Target(model_id="test-model", provider="fake", provider_model="fake-model-v1")
# About 93 KB of tool schemas: the size the review found billed as 5 prompt tokens when a stream was cut.
BIG_TOOLS = tuple(
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": "Looks things up. " * 50,
            "parameters": {"type": "object", "properties": {f"f{j}": {"type": "string"} for j in range(20)}},
        },
    }
    for i in range(60)
)
LONG_ANSWER = " ".join(["tokens"] * 4300)  # about 30,000 characters, echoed back by the fake


def at_least(chars: int) -> int:
    """The fewest tokens the conservative estimate may give for `chars` characters."""
    return chars // ESTIMATE_CHARS_PER_TOKEN


def ask(text: str, **options) -> ChatRequest:
    return ChatRequest(model="test-model", messages=(Message("user", text),), **options)


@pytest.fixture(scope="module")
def fake() -> FakeProvider:
    with FakeProvider(fault="no_usage") as provider:
        yield provider


@pytest.fixture(params=["openai", "anthropic"])
async def provider(
    request: pytest.FixtureRequest, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[HttpProvider]:
    monkeypatch.setenv(KEY_ENV, "test-key")
    kind = request.param
    url = fake.openai_base_url if kind == "openai" else fake.anthropic_base_url
    config = ProviderConfig(type=kind, base_url=url, api_key_env=KEY_ENV, timeout_seconds=5.0)
    adapter = (OpenAICompatibleProvider if kind == "openai" else AnthropicProvider)("fake", config)
    yield adapter
    await adapter.close()


# --- answers without usage -----------------------------------------------------------------------------


async def test_an_answer_without_usage_is_billed_for_estimates(provider):
    completion = await provider.complete(TARGET, ask(LONG_ANSWER, max_tokens=5000))

    assert completion.text == LONG_ANSWER
    assert completion.prompt_tokens >= at_least(len(LONG_ANSWER))
    assert completion.completion_tokens >= at_least(len(LONG_ANSWER))


async def test_a_tool_call_without_usage_is_billed_for_the_tools_and_the_call(provider):
    completion = await provider.complete(TARGET, ask("weather in Paris", tools=BIG_TOOLS[:1]))

    (call,) = completion.tool_calls
    assert completion.prompt_tokens >= at_least(len(json.dumps(BIG_TOOLS[:1])))
    assert completion.completion_tokens >= at_least(len(call["function"]["arguments"])) > 0


async def test_embeddings_without_usage_are_billed_for_estimates(fake, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    config = ProviderConfig(type="openai", base_url=fake.openai_base_url, api_key_env=KEY_ENV)
    provider = OpenAICompatibleProvider("fake", config)
    try:
        inputs = ["red apple " * 100, "green"]
        vectors, prompt_tokens = await provider.embed(TARGET, inputs)
    finally:
        await provider.close()

    assert len(vectors) == 2
    assert prompt_tokens >= at_least(sum(map(len, inputs)))


class _CountlessInference:
    """A ModelInference whose replies leave the counts unset (0 on the wire)."""

    async def Generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return pb.GenerateResponse(text=request.messages[-1].content, finish_reason=pb.FINISH_REASON_STOP)

    async def Embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        return pb.EmbedResponse(embeddings=[pb.Vector(values=[0.5]) for _ in request.inputs])


@pytest.fixture
def local() -> LocalProvider:
    provider = LocalProvider.__new__(LocalProvider)  # no channel: the stub stands in for ModelInference
    provider.name = "local"
    provider._stub = _CountlessInference()
    return provider


async def test_a_local_answer_without_counts_is_billed_for_estimates(local):
    completion = await local.complete(TARGET, ask(LONG_ANSWER))

    assert completion.prompt_tokens >= at_least(len(LONG_ANSWER))
    assert completion.completion_tokens >= at_least(len(LONG_ANSWER))


async def test_local_embeddings_without_counts_are_billed_for_estimates(local):
    _, prompt_tokens = await local.embed(TARGET, ["red apple " * 100])

    assert prompt_tokens >= at_least(1000)


def test_an_anthropic_stream_ended_without_an_output_count_is_billed_for_what_it_delivered():
    """message_start's output_tokens (1) is a placeholder, not the answer's count."""
    state = _StreamState()
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": LONG_ANSWER}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}},
    ]
    tally = StreamTally(prompt_estimate=1)
    for event in events:
        chunk = state.chunk(event)
        if chunk is not None:
            tally.add(chunk)
    tally.add(state.final())

    completion = tally.completion()
    assert completion.prompt_tokens == 12
    assert completion.completion_tokens >= at_least(len(LONG_ANSWER))


# --- the prompt of a stream cut short --------------------------------------------------------------------


def cut_stream(prompt_estimate: int) -> StreamTally:
    """A stream that delivered a word, then was cut before any usage arrived."""
    tally = StreamTally(prompt_estimate=prompt_estimate)
    tally.add(CompletionChunk(text="Sure"))
    return tally


def test_a_cut_stream_is_billed_for_the_tools_and_response_format_it_was_sent():
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    request = ask("hi", tools=BIG_TOOLS, tool_choice="auto", response_format=response_format)

    completion = cut_stream(request.estimated_prompt_tokens()).completion()

    sent_beside = len(json.dumps(BIG_TOOLS)) + len(json.dumps(response_format))
    assert sent_beside > 90_000
    assert completion.prompt_tokens >= at_least(sent_beside)


def test_a_cut_streams_prompt_counts_the_tool_calls_and_tool_results_it_carries():
    arguments = json.dumps({"query": "x" * 3000})
    call = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": arguments}}
    messages = (
        Message("user", "look it up"),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "found " * 500, tool_call_id="call_1"),
    )

    completion = cut_stream(estimated_prompt_tokens(messages)).completion()

    assert completion.prompt_tokens >= at_least(len(json.dumps(call)) + len("found " * 500))
