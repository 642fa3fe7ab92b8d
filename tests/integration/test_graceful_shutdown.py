"""SIGTERM drains: an in-flight stream finishes, health turns NOT_SERVING, new calls are refused."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.support import mesh_environ
from tools.mesh import Mesh

KEY = "sk-drain-test-key-01"


@pytest.fixture
def small_mesh(tmp_path):
    mesh = Mesh(tmp_path, mesh_environ({"SOPHIA_DEV_KEY": KEY}))
    try:
        for component in ("inference", "gateway"):
            mesh.start(component)
        mesh.wait_ready(["inference", "gateway"], 300)
        yield mesh
    finally:
        mesh.stop_all()


async def test_sigterm_lets_an_in_flight_stream_finish(small_mesh):
    gateway = small_mesh.processes["gateway"]
    request = gateway_pb2.StreamChatCompletionRequest()
    request.params.model = "auto"
    request.params.max_tokens = 24
    message = request.params.messages.add(role="user")
    message.content.string_value = "Write a long story about a lighthouse keeper."
    async with grpc.aio.insecure_channel(small_mesh.address("gateway")) as channel:
        stream = gateway_pb2_grpc.GatewayServiceStub(channel).StreamChatCompletion(
            request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=120
        )
        chunks = [await anext(stream.__aiter__())]
        gateway.send_signal(signal.SIGTERM)

        await asyncio.sleep(0.3)
        async with grpc.aio.insecure_channel(small_mesh.address("gateway")) as probe:
            try:
                reply = await health_pb2_grpc.HealthStub(probe).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            except grpc.aio.AioRpcError as refused:  # already refusing new calls: also a correct drain
                assert refused.code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        async for chunk in stream:
            chunks.append(chunk)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].HasField("finish_reason")
    ]
    assert finishes == ["length"], "the stream was cut instead of drained"
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert len(text) > 40
    assert await asyncio.to_thread(gateway.wait, 30) == 0
