"""ModelInference at capacity, as its own small process: one row, one queue place and a small KV budget.
Beyond the queue a request is refused at once (the Gateway then falls back), never left to hang; a
request that needs more KV tokens than the budget is OUT_OF_RANGE."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tests.support import free_port_block, internal_channel, mesh_environ
from tools.mesh import Mesh

MODEL = "smollm2-135m-instruct"
# A lone sequence counts 4 rows (a decode step's padded product, batching._footprint): 4 × 512.
KV_TOKEN_BUDGET = 2048


@pytest.fixture(scope="module")
def small_inference(tmp_path_factory):
    environ = mesh_environ(
        {
            "SOPHIA__INFERENCE__MAX_BATCH_SIZE": "1",
            "SOPHIA__INFERENCE__MAX_QUEUED_GENERATIONS": "1",
            "SOPHIA__INFERENCE__KV_TOKEN_BUDGET": str(KV_TOKEN_BUDGET),
            "SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT": str(free_port_block(len(PROMETHEUS_PORT_OFFSETS))),
        }
    )
    mesh = Mesh(tmp_path_factory.mktemp("inference"), environ)
    try:
        mesh.start("inference")
        mesh.wait_ready(["inference"], 300)
        yield mesh
    finally:
        mesh.stop_all()


@pytest.fixture
async def inference(small_inference):
    async with internal_channel(small_inference, "inference") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def stream_request(prompt: str, max_tokens: int) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model=MODEL,
        messages=[pb.Message(role="user", content=prompt)],
        options=pb.GenerationOptions(max_tokens=max_tokens),
    )


async def metric(mesh: Mesh, name: str, **labels: str) -> float:
    port = mesh.config.telemetry.prometheus_base_port + PROMETHEUS_PORT_OFFSETS["inference"]
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def refusals(mesh: Mesh, reason: str) -> float:
    return await metric(mesh, "sophia_inference_refused_total", reason=reason)


async def wait_until_idle(mesh: Mesh) -> None:
    """Cancelled generations leave at the next step boundary; the next test needs the row and queue."""
    for _ in range(300):
        running = await metric(mesh, "sophia_inference_sequences_running")
        if running + await metric(mesh, "sophia_inference_sequences_waiting") == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the cancelled generations never left")


async def test_beyond_the_queue_a_request_is_refused_at_once_not_left_to_hang(small_inference, inference):
    running = inference.GenerateStream(stream_request("Tell me a very long story.", 400), timeout=300)
    await anext(running.__aiter__())  # it holds the only row
    waiting = inference.GenerateStream(stream_request("Tell me another long story.", 400), timeout=300)
    await asyncio.sleep(0.5)  # it takes the only queue place
    before = await refusals(small_inference, "queue_full")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            # A deadline far shorter than either answer: a refusal, not a wait, is what must come back.
            await inference.Generate(
                pb.GenerateRequest(
                    model=MODEL,
                    messages=[pb.Message(role="user", content="Hi")],
                    options=pb.GenerationOptions(max_tokens=4),
                ),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "at capacity" in refused.value.details()
        assert await refusals(small_inference, "queue_full") == before + 1
    finally:
        running.cancel()
        waiting.cancel()
        await wait_until_idle(small_inference)


async def test_the_waiting_request_runs_once_the_row_is_free(inference):
    first = inference.Generate(
        pb.GenerateRequest(
            model=MODEL,
            messages=[pb.Message(role="user", content="What is 2 + 2?")],
            options=pb.GenerationOptions(max_tokens=8),
        ),
        timeout=300,
    )
    second = inference.Generate(
        pb.GenerateRequest(
            model=MODEL,
            messages=[pb.Message(role="user", content="Name a colour.")],
            options=pb.GenerationOptions(max_tokens=8),
        ),
        timeout=300,
    )
    answers = await asyncio.gather(first, second)
    assert all(answer.completion_tokens > 0 and answer.text for answer in answers)


async def test_a_request_beyond_the_kv_budget_is_out_of_range(small_inference, inference):
    before = await refusals(small_inference, "kv_budget")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await inference.Generate(
            pb.GenerateRequest(
                model=MODEL,
                messages=[pb.Message(role="user", content="Hi")],
                options=pb.GenerationOptions(max_tokens=1000),  # 4 rows × 1,088 tokens
            ),
            timeout=30,
        )
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"budget of {KV_TOKEN_BUDGET}" in refused.value.details()
    assert await refusals(small_inference, "kv_budget") == before + 1
