"""Response headers made of client input or Router output never fail the call: gRPC refuses a metadata
value with anything but printable ASCII, and by the time the headers go out the answer was billed."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.api.gateway_servicer import GatewayServicer, header_value
from services.gateway.serving.request_flow import ChatOutcome

# What a client's task type or an operator's model ids and task types could put in the headers.
HOSTILE = ChatOutcome(
    model_id="modèle",
    provider="p\x7f",
    attempts=1,
    cache="miss",
    task_type="café\r\nx-injected: 1",
    difficulty="simple",
    route_reason="task_type=\tpoésie → gpt-4o",
)


class _Answers(health_pb2_grpc.HealthServicer):
    """Sends the Gateway's response headers for HOSTILE, then answers, as CreateChatCompletion does."""

    async def Check(self, request, context):
        await context.send_initial_metadata(GatewayServicer._response_headers("rid-1", HOSTILE))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_control_characters_leave_a_header_value_too():
    assert header_value("a\nb\r\tc\x00d\x7fe → f") == "abcde -> f"


async def test_headers_from_hostile_values_reach_the_client():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(_Answers(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert (await call).status == health_pb2.HealthCheckResponse.SERVING
            headers = dict(await call.initial_metadata())
    finally:
        await server.stop(0)
    assert headers["x-sophia-task-type"] == "cafx-injected: 1"
    assert headers["x-sophia-model"] == "modle"
    assert headers["x-sophia-provider"] == "p"
    assert headers["x-sophia-route-reason"] == "task_type=posie -> gpt-4o"
