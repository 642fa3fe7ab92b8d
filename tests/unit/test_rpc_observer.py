"""The server runtime every service runs (`libs.server`), against an in-process gRPC server: the interceptor
wraps each method's handler once, not per call, and without tracing the caller's trace context still
becomes the current one, so the calls the RPC makes carry it on; services are added through their generic
handler only."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from libs.server import GenericHandlersOnly, _Observed
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


class _RecordsRegistrations:
    """A real server that notes which services were added as registered methods."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self.registered.append(service_name)
        self._server.add_registered_method_handlers(service_name, method_handlers)


async def test_services_are_served_through_their_generic_handler_with_no_registered_methods():
    server = grpc.aio.server(interceptors=[_Observed()])
    recording = _RecordsRegistrations(server)
    seen = _Seen()
    health_pb2_grpc.add_HealthServicer_to_server(seen, GenericHandlersOnly(recording))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(0)
    assert recording.registered == []  # each would be one more pending call per arriving RPC
    assert len(seen.trace_ids) == 1
