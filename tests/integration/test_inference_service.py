"""ModelInference over gRPC (the session mesh's process, continuous batching): concurrent streams share
the batch and still get their own answers; cancellation, deadlines, stop strings, validation."""

from __future__ import annotations

import asyncio
import math

import grpc
import httpx
import pytest
from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from tests.integration.conftest import metrics_url
from tests.support import internal_channel

MODEL = "smollm2-135m-instruct"
TOPICS = [
    "the capital of France", "a fruit", "the colour of the sky", "hello in French", "a prime number",
    "the largest ocean", "a famous painter", "how bees make honey", "the boiling point of water",
    "a dog's best trick", "why leaves fall", "the speed of light", "a good breakfast", "how to tie a knot",
    "the tallest mountain", "a word that rhymes with cat",
]  # fmt: skip
PROMPTS = [f"In one sentence, tell me about {topic}." for topic in TOPICS]


@pytest.fixture(scope="module")
async def inference(mesh):
    async with internal_channel(mesh, "inference") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def options(max_tokens: int = 12, **extra) -> pb.GenerationOptions:
    return pb.GenerationOptions(max_tokens=max_tokens, **extra)


def generate(prompt: str, max_tokens: int = 12, **extra) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL, messages=[pb.Message(role="user", content=prompt)], options=options(max_tokens, **extra)
    )


def stream_request(prompt: str, max_tokens: int = 12, **extra) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model=MODEL, messages=[pb.Message(role="user", content=prompt)], options=options(max_tokens, **extra)
    )


async def read_stream(call) -> tuple[str, pb.GenerateStreamResponse]:
    pieces = [piece async for piece in call]
    return "".join(piece.text for piece in pieces), pieces[-1]


async def running_sequences(mesh) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(metrics_url(mesh, "inference"), timeout=10)).text
    samples = [line for line in text.splitlines() if line.startswith("sophia_inference_sequences_running")]
    return float(samples[0].rsplit(" ", 1)[1])


async def wait_for_running(mesh, count: int) -> None:
    for _ in range(300):
        if await running_sequences(mesh) == count:
            return
        await asyncio.sleep(0.1)
    assert await running_sequences(mesh) == count


async def test_sixteen_concurrent_streams_get_the_answers_each_gets_alone(inference):
    alone = [(await inference.Generate(generate(prompt), timeout=120)).text for prompt in PROMPTS]
    together = await asyncio.gather(
        *(read_stream(inference.GenerateStream(stream_request(prompt), timeout=300)) for prompt in PROMPTS)
    )
    assert [text for text, _ in together] == alone
    assert len(set(alone)) == len(PROMPTS)
    for _, last in together:
        assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert 0 < last.completion_tokens <= 12 and last.prompt_tokens > 20


async def test_stop_strings_and_max_tokens_are_honoured_inside_a_batch(inference):
    full = (await inference.Generate(generate("What is the capital of France?", 20), timeout=120)).text
    assert " Paris" in full
    stopped, short, plain = await asyncio.gather(
        inference.Generate(generate("What is the capital of France?", 20, stop=[" Paris"]), timeout=120),
        inference.Generate(generate("Write a long story about a dragon.", 3), timeout=120),
        inference.Generate(generate("What is the capital of France?", 20), timeout=120),
    )
    assert (stopped.text, stopped.finish_reason) == (full[: full.index(" Paris")], pb.FINISH_REASON_STOP)
    assert (short.completion_tokens, short.finish_reason) == (3, pb.FINISH_REASON_LENGTH)
    assert plain.text == full


async def test_a_cancelled_stream_leaves_the_batch_and_the_others_go_on(mesh, inference):
    expected = [(await inference.Generate(generate(prompt, 16), timeout=120)).text for prompt in PROMPTS[:2]]
    doomed = inference.GenerateStream(stream_request("Tell me a very long story.", 1000), timeout=300)
    others = [inference.GenerateStream(stream_request(prompt, 16), timeout=300) for prompt in PROMPTS[:2]]
    await anext(doomed.__aiter__())
    doomed.cancel()
    # Left running, ~1000 tokens would hold its row for minutes; cancelled, it leaves at the next step.
    await wait_for_running(mesh, 0)
    assert [text for text, _ in await asyncio.gather(*(read_stream(call) for call in others))] == expected


async def test_a_deadline_ends_a_generation(mesh, inference):
    call = inference.GenerateStream(stream_request("Tell me a very long story.", 1000), timeout=2)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await read_stream(call)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for_running(mesh, 0)


async def test_a_prompt_too_long_for_the_window_is_out_of_range_naming_messages(inference):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await inference.Generate(generate("word " * 9000, 16), timeout=60)
    # Not INVALID_ARGUMENT: the Gateway moves on to a model with a larger window.
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert refused.value.details().startswith("messages: ") and "8192" in refused.value.details()


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (pb.GenerateRequest(model="nope", options=options(1)), "NOT_FOUND", "model"),
        (pb.GenerateRequest(model=MODEL, options=options(1)), "INVALID_ARGUMENT", "messages"),
        (generate("hi", 0), "INVALID_ARGUMENT", "options.max_tokens"),
        (generate("hi", 100_000), "INVALID_ARGUMENT", "options.max_tokens"),
        (generate("hi", temperature=1e30), "INVALID_ARGUMENT", "options.temperature"),
        (generate("hi", temperature=-1), "INVALID_ARGUMENT", "options.temperature"),
        (generate("hi", temperature=math.nan), "INVALID_ARGUMENT", "options.temperature"),
        (generate("hi", top_p=0), "INVALID_ARGUMENT", "options.top_p"),
        (generate("hi", stop=["a", "b", "c", "d", "e"]), "INVALID_ARGUMENT", "options.stop"),
        (generate("hi", stop=["x" * 10_000]), "INVALID_ARGUMENT", "options.stop"),
        (
            pb.GenerateRequest(
                model=MODEL, messages=[pb.Message(role="x", content="hi")], options=options(1)
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
    assert raised.value.details().startswith(field)


async def test_an_invalid_stream_request_is_refused_before_any_token(inference):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read_stream(inference.GenerateStream(stream_request("hi", temperature=9), timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("options.temperature")


async def test_concurrent_embed_calls_get_the_vectors_each_gets_alone(inference):
    texts = [f"sentence number {i} about {topic}" for i, topic in enumerate(TOPICS)]

    def embed(inputs: list[str]):
        return inference.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=inputs), timeout=60)

    alone = [await embed([text]) for text in texts[:4]]
    together = await asyncio.gather(*(embed([text]) for text in texts[:4]), embed(texts[4:]))
    for one, shared in zip(alone, together[:4], strict=True):
        assert shared.prompt_tokens == one.prompt_tokens > 2
        vectors = (one.embeddings[0].values, shared.embeddings[0].values)
        similarity = sum(a * b for a, b in zip(*vectors, strict=True))
        assert similarity == pytest.approx(1.0, abs=1e-5)
    assert [len(v.values) for v in together[4].embeddings] == [384] * (len(texts) - 4)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await embed([""])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0]" in raised.value.details()


async def test_list_models_shows_the_batch_capacity(inference):
    models = {m.id: m for m in (await inference.ListModels(pb.ListModelsRequest(), timeout=10)).models}
    assert set(models) == {MODEL, "all-minilm-l6-v2"}
    chat = models[MODEL]
    assert (chat.context_window, chat.max_running) == (8192, 32)
    assert chat.kv_token_budget == 32768  # the CPU default
    assert models["all-minilm-l6-v2"].dimensions == 384
