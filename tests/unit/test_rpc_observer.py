"""The server interceptor every service runs (`libs.server._Observed`), against an in-process gRPC server:
each method's handler is wrapped once, not per call, and without tracing the caller's trace context still
becomes the current one, so the calls the RPC makes carry it on."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from libs.server import _Observed
from tests.support import free_port

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
TRACEPARENT = f"00-{TRACE_ID:032x}-b7ad6b7169203331-01"


class _Seen(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.trace_ids: list[int] = []

    async def Check(self, request, context):
        self.trace_ids.append(trace.get_current_span().get_span_context().trace_id)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class _CountsLookups(grpc.aio.ServerInterceptor):
    """Runs inside _Observed: counts how often the method's handler is looked up."""

    def __init__(self) -> None:
        self.lookups = 0

    async def intercept_service(self, continuation, handler_call_details):
        self.lookups += 1
        return await continuation(handler_call_details)


@pytest.fixture
async def served():
    seen, lookups = _Seen(), _CountsLookups()
    server = grpc.aio.server(interceptors=[_Observed(), lookups])
    health_pb2_grpc.add_HealthServicer_to_server(seen, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel), seen, lookups
    await server.stop(0)


async def test_each_method_is_wrapped_once_not_per_call(served):
    stub, seen, lookups = served
    for _ in range(5):
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert len(seen.trace_ids) == 5
    assert lookups.lookups == 1


async def test_without_tracing_the_callers_trace_context_is_current(served):
    stub, seen, _ = served
    await stub.Check(health_pb2.HealthCheckRequest(), metadata=(("traceparent", TRACEPARENT),), timeout=5)
    await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert seen.trace_ids == [TRACE_ID, 0]
