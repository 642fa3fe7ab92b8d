"""ModelInference over gRPC: concurrent requests, cancellation, validation."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from tests.integration.conftest import metrics_url
from tests.support import internal_channel

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
async def inference(mesh):
    async with internal_channel(mesh, "inference") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def generate(prompt: str, max_tokens: int = 12) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL,
        messages=[pb.Message(role="user", content=prompt)],
        options=pb.GenerationOptions(max_tokens=max_tokens),
    )


async def test_concurrent_requests_each_get_their_own_answer(inference):
    prompts = ["What is 2+2?", "Name a fruit.", "What colour is the sky?", "Say hello in French."]
    alone = [(await inference.Generate(generate(p), timeout=120)).text for p in prompts]
    together = await asyncio.gather(*(inference.Generate(generate(p), timeout=120) for p in prompts))
    assert [reply.text for reply in together] == alone
    assert len(set(alone)) == len(alone)


async def _generations_in_flight(mesh) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(metrics_url(mesh, "inference"), timeout=10)).text
    samples = [line for line in text.splitlines() if line.startswith("sophia_inference_sequences_running")]
    return float(samples[0].rsplit(" ", 1)[1])


async def test_cancelling_a_stream_stops_the_generation(mesh, inference):
    request = pb.GenerateStreamRequest(
        model=MODEL,
        messages=[pb.Message(role="user", content="Tell me a very long story.")],
        options=pb.GenerationOptions(max_tokens=1000),
    )
    call = inference.GenerateStream(request, timeout=120)
    await anext(call.__aiter__())
    assert await _generations_in_flight(mesh) == 1
    call.cancel()
    # Left running, ~1000 tokens would keep the slot busy for half a minute or more; stopped, it frees
    # the slot within a token.
    for _ in range(100):
        if await _generations_in_flight(mesh) == 0:
            break
        await asyncio.sleep(0.1)
    assert await _generations_in_flight(mesh) == 0
    reply = await inference.Generate(generate("Say yes.", 4), timeout=120)
    assert reply.completion_tokens > 0


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (pb.GenerateRequest(model="nope", options=pb.GenerationOptions(max_tokens=1)), "NOT_FOUND", "model"),
        (
            pb.GenerateRequest(model=MODEL, options=pb.GenerationOptions(max_tokens=1)),
            "INVALID_ARGUMENT",
            "messages",
        ),
        (generate("hi", 0), "INVALID_ARGUMENT", "max_tokens"),
        (
            pb.GenerateRequest(
                model=MODEL,
                messages=[pb.Message(role="x", content="hi")],
                options=pb.GenerationOptions(max_tokens=1),
            ),
            "INVALID_ARGUMENT",
            "messages[0].role",
        ),
    ],
)
async def test_invalid_generation_requests(inference, request_, code, field):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inference.Generate(request_, timeout=30)
    assert raised.value.code().name == code
    assert field in raised.value.details()


async def test_embed_and_list_models(inference):
    reply = await inference.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["a", "b"]), timeout=30)
    assert [len(v.values) for v in reply.embeddings] == [384, 384]
    models = await inference.ListModels(pb.ListModelsRequest(), timeout=10)
    assert {m.id for m in models.models} == {MODEL, "all-minilm-l6-v2"}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inference.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=[""]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0]" in raised.value.details()
