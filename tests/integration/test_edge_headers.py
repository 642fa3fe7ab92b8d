"""What the Envoy edge passes to the Gateway: a recording GatewayService stands behind the real Envoy."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.support import mesh_environ
from tools.mesh import Mesh

GATEWAY_SERVICE = "sophia.gateway.v1.GatewayService"


class RecordingGateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def ListModels(self, request, context):
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        self.seen.append(metadata)
        if "authorization" not in metadata:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing API key")
        return gateway_pb2.ListModelsResponse(object="list")

    async def CreateChatCompletion(self, request, context):
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        self.seen.append(metadata)
        answer_headers = (("x-request-id", "rid-9"), ("x-sophia-provider", "recorded"))
        if metadata.get("x-sophia-edge-headers-in-trailers") == "1":
            context.set_trailing_metadata(answer_headers)
        else:
            await context.send_initial_metadata(answer_headers)
        return gateway_pb2.CreateChatCompletionResponse(id="chatcmpl-rid-9", object="chat.completion")


@pytest.fixture
async def edge(tmp_path):
    mesh = Mesh(tmp_path, mesh_environ())
    recorder = RecordingGateway()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(recorder, server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    await checks.set(GATEWAY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(mesh.address("gateway"))
    await server.start()
    try:
        mesh.start("envoy")
        await asyncio.to_thread(mesh.wait_ready, ["envoy"], 60)
        yield mesh.edge_url, recorder
    finally:
        await asyncio.to_thread(mesh.stop_all)
        await server.stop(0)


async def test_client_x_envoy_headers_are_stripped_and_auth_and_request_id_pass(edge):
    url, recorder = edge
    async with httpx.AsyncClient(base_url=url) as client:
        reply = await client.get(
            "/v1/models",
            headers={
                "Authorization": "Bearer sk-some-key-123",
                "x-request-id": "client-id-42",
                "x-envoy-retry-on": "5xx",
                "x-envoy-max-retries": "10",
                "x-envoy-made-up-header": "1",
            },
        )
    assert reply.status_code == 200, reply.text
    seen = recorder.seen[-1]
    client_sent = {"x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-made-up-header"}
    assert not client_sent & set(seen), seen
    assert seen["authorization"] == "Bearer sk-some-key-123"
    assert seen["x-request-id"] == "client-id-42"


async def test_a_unary_answers_headers_are_asked_for_in_trailers_and_lifted_into_http_headers(edge):
    """The edge asks for a unary chat answer's headers in the answer's own gRPC batch (trailing metadata),
    lifts them into the HTTP headers, and a client cannot set that request header itself."""
    url, recorder = edge
    async with httpx.AsyncClient(base_url=url) as client:
        reply = await client.post(
            "/v1/chat/completions",
            headers={"Authorization": "Bearer sk-some-key-123", "x-sophia-edge-headers-in-trailers": "yes"},
            json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        )
        listed = await client.get(
            "/v1/models",
            headers={"Authorization": "Bearer sk-some-key-123", "x-sophia-edge-headers-in-trailers": "1"},
        )
    assert reply.status_code == 200, reply.text
    assert recorder.seen[-2]["x-sophia-edge-headers-in-trailers"] == "1"  # the edge's, not the client's
    assert reply.headers.get_list("x-request-id") == ["rid-9"]
    assert reply.headers["x-sophia-provider"] == "recorded"
    assert listed.status_code == 200
    assert "x-sophia-edge-headers-in-trailers" not in recorder.seen[-1]  # not a unary answer: stripped
