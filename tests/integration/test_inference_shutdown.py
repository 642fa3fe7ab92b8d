"""SIGTERM to ModelInference: the running batch finishes, or, when the grace is too short for it, its
answers end with `length` before the process exits; nothing new is taken meanwhile."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from tests.support import internal_channel, mesh_environ
from tools.mesh import Mesh

MODEL = "smollm2-135m-instruct"


def start_inference(state, drain_seconds: int) -> Mesh:
    mesh = Mesh(state, mesh_environ({"SOPHIA__SERVER__DRAIN_SECONDS": str(drain_seconds)}))
    try:
        mesh.start("inference")
        mesh.wait_ready(["inference"], 300)
    except BaseException:
        mesh.stop_all()
        raise
    return mesh


@pytest.fixture
def inference_process(tmp_path):
    started = []

    def start(drain_seconds: int) -> Mesh:
        started.append(start_inference(tmp_path / str(len(started)), drain_seconds))
        return started[-1]

    yield start
    for mesh in started:
        mesh.stop_all()


def stream_request(prompt: str, max_tokens: int) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model=MODEL,
        messages=[pb.Message(role="user", content=prompt)],
        options=pb.GenerationOptions(max_tokens=max_tokens),
    )


async def rest_of(call, first: pb.GenerateStreamResponse) -> list[pb.GenerateStreamResponse]:
    return [first, *[piece async for piece in call]]


async def refused_while_draining(stub) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(
            pb.GenerateRequest(
                model=MODEL,
                messages=[pb.Message(role="user", content="Hi")],
                options=pb.GenerationOptions(max_tokens=2),
            ),
            timeout=10,
        )
    return refused.value.code()


async def test_sigterm_lets_the_running_batch_finish(inference_process):
    mesh = inference_process(drain_seconds=120)
    process = mesh.processes["inference"]
    async with internal_channel(mesh, "inference") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        prompts = ["Write a long story about a lighthouse.", "Describe a long journey by train."]
        calls = [stub.GenerateStream(stream_request(prompt, 24), timeout=300) for prompt in prompts]
        firsts = [await anext(call.__aiter__()) for call in calls]
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert await refused_while_draining(stub) == grpc.StatusCode.UNAVAILABLE
        answers = await asyncio.gather(
            *(rest_of(call, first) for call, first in zip(calls, firsts, strict=True))
        )
    for pieces in answers:
        last = pieces[-1]
        assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        if last.finish_reason == pb.FINISH_REASON_LENGTH:
            assert last.completion_tokens == 24  # the whole answer, not one cut short
    assert await asyncio.to_thread(process.wait, 60) == 0


async def test_a_grace_too_short_for_the_batch_ends_its_answers_with_length(inference_process):
    mesh = inference_process(drain_seconds=4)
    process = mesh.processes["inference"]
    async with internal_channel(mesh, "inference") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        call = stub.GenerateStream(
            stream_request("Tell me a very long story about the sea.", 1000), timeout=300
        )
        first = await anext(call.__aiter__())
        process.send_signal(signal.SIGTERM)
        pieces = await rest_of(call, first)  # ends normally: no CANCELLED or UNAVAILABLE status
    assert pieces[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert 1 <= pieces[-1].completion_tokens < 1000
    assert "".join(piece.text for piece in pieces)
    assert await asyncio.to_thread(process.wait, 60) == 0
