"""The server and client runtime over real processes: undecodable messages, streams under the mesh's rules.

- Bytes that do not parse as the request type get INVALID_ARGUMENT naming the type, on every service.
- A streamed chat carries the caller's deadline and trace context to ModelInference: one trace.
- grpc.health.v1 Watch streams status changes.
- Clients that leave mid-stream leave no context or task errors in the service logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from sophia.cache.v1 import cache_pb2
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from sophia.inference.v1 import inference_pb2, inference_pb2_grpc
from sophia.ledger.v1 import ledger_pb2
from sophia.router.v1 import router_pb2

from libs.server import DEADLINE_ATTRIBUTE, REQUEST_ID_ATTRIBUTE
from tests.support import internal_channel, mesh_environ
from tools.mesh import SERVICES, Mesh

KEY = "sk-rpc-runtime-key-01"
MODEL = "smollm2-135m-instruct"


class TraceCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[tuple[str, object]] = []  # (service.name, span)

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self._spans.extend((attributes.get("service.name", ""), s) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, service: str, name: str) -> list:
        with self._lock:
            return [span for owner, span in self._spans if owner == service and span.name == name]


class _MetricsSink(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Takes the services' OTLP metrics, so their exporters have nothing to complain about."""

    def Export(self, request, context):
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def collector():
    sink = TraceCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsSink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sink.endpoint = f"http://127.0.0.1:{port}"
    yield sink
    server.stop(0)


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory, collector):
    environ = mesh_environ(
        {
            "SOPHIA_DEV_KEY": KEY,
            "SOPHIA__TELEMETRY__OTLP_ENDPOINT": collector.endpoint,
            # Export spans within a fraction of a second instead of every 5 s.
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
    )
    environ["SOPHIA__GATEWAY__OUTBOX_DIR"] = str(tmp_path_factory.mktemp("outbox"))
    mesh = Mesh(tmp_path_factory.mktemp("rpc-mesh"), environ)
    try:
        mesh.start("redis")
        mesh.wait_ready(["redis"], 30)
        for service in SERVICES:
            mesh.start(service)
        mesh.wait_ready(SERVICES, 300)
        yield mesh
    finally:
        mesh.stop_all()


def _channel(mesh: Mesh, service: str) -> grpc.aio.Channel:
    if service == "gateway":  # the public front door
        return grpc.aio.insecure_channel(mesh.address("gateway"))
    return internal_channel(mesh, service)


# --- undecodable messages ------------------------------------------------------------------------

NESTING = 150  # protobuf refuses more than 100 levels
# One unknown group (field 999) opened NESTING times, then closed as often.
TOO_DEEP = bytes([0xBB, 0x3E]) * NESTING + bytes([0xBC, 0x3E]) * NESTING
PAYLOADS = {
    "bad-utf8": b"\x0a\x02\xff\xfe",  # field 1, a string, holding two bytes that are not UTF-8
    "truncated": b"\x0a\x10abc",  # field 1 announces 16 bytes, 3 follow
    "random": random.Random(13).randbytes(64),
    "too-deep": TOO_DEEP,
}
# service → (method, request type, whether it streams); field 1 of each request is a string, except the
# Gateway's (its params), where field 1 of the params is the model.
METHODS = {
    "gateway": [
        (
            "/sophia.gateway.v1.GatewayService/CreateChatCompletion",
            gateway_pb2.CreateChatCompletionRequest,
            False,
        ),
        (
            "/sophia.gateway.v1.GatewayService/StreamChatCompletion",
            gateway_pb2.StreamChatCompletionRequest,
            True,
        ),
    ],
    "router": [("/sophia.router.v1.RouterService/Route", router_pb2.RouteRequest, False)],
    "cache": [("/sophia.cache.v1.CacheService/Lookup", cache_pb2.LookupRequest, False)],
    "ledger": [("/sophia.ledger.v1.LedgerService/CheckBudget", ledger_pb2.CheckBudgetRequest, False)],
    "inference": [
        ("/sophia.inference.v1.InferenceService/Generate", inference_pb2.GenerateRequest, False),
        ("/sophia.inference.v1.InferenceService/GenerateStream", inference_pb2.GenerateStreamRequest, True),
    ],
}


def _payload(kind: str, message_type) -> bytes:
    payload = PAYLOADS[kind]
    if kind == "bad-utf8" and message_type in (
        gateway_pb2.CreateChatCompletionRequest,
        gateway_pb2.StreamChatCompletionRequest,
    ):
        payload = b"\x0a" + bytes([len(payload)]) + payload  # params { model: <bad UTF-8> }
    return payload


@pytest.mark.parametrize("service", SERVICES)
async def test_undecodable_requests_are_invalid_argument_on_every_service(traced_mesh, service):
    async with _channel(traced_mesh, service) as channel:
        for method, message_type, streams in METHODS[service]:
            for kind in PAYLOADS:
                payload = _payload(kind, message_type)
                with pytest.raises(DecodeError):  # the payload really is undecodable
                    message_type.FromString(payload)
                if streams:
                    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        async for _ in call(payload, timeout=10):
                            pass
                else:
                    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call(payload, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, kind)
                expected = f"request: not a valid {message_type.DESCRIPTOR.full_name}"
                assert refused.value.details() == expected, (method, kind)
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert "Unexpected" not in traced_mesh.tail(service, 200)


# --- streams ---------------------------------------------------------------------------------------


def _stream_request(max_tokens: int) -> gateway_pb2.StreamChatCompletionRequest:
    request = gateway_pb2.StreamChatCompletionRequest()
    request.params.model = "auto"
    request.params.max_tokens = max_tokens
    request.params.cache = False
    message = request.params.messages.add(role="user")
    message.content.string_value = "Tell me a long story about a lighthouse keeper."
    return request


async def _poll(find, within: float = 30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        await asyncio.sleep(0.2)
    return find()


async def test_a_streamed_chat_is_one_trace_and_its_deadline_reaches_inference(traced_mesh, collector):
    request_id = "rpc-runtime-stream-trace-1"
    async with _channel(traced_mesh, "gateway") as channel:
        stream = gateway_pb2_grpc.GatewayServiceStub(channel).StreamChatCompletion(
            _stream_request(4),
            metadata=(("authorization", f"Bearer {KEY}"), ("x-request-id", request_id)),
            timeout=60,
        )
        chunks = [chunk async for chunk in stream]
    assert chunks

    def spans_of_this_request(service: str, name: str) -> list:
        return [
            span
            for span in collector.spans(service, name)
            if any(
                a.key == REQUEST_ID_ATTRIBUTE and a.value.string_value == request_id for a in span.attributes
            )
        ]

    gateway = await _poll(
        lambda: spans_of_this_request(
            "sophia-gateway", "sophia.gateway.v1.GatewayService/StreamChatCompletion"
        )
    )
    inference = await _poll(
        lambda: spans_of_this_request(
            "sophia-inference", "sophia.inference.v1.InferenceService/GenerateStream"
        )
    )
    assert len(gateway) == 1
    assert len(inference) == 1, "GenerateStream arrived without the request id"
    assert inference[0].trace_id == gateway[0].trace_id, "the stream to inference started its own trace"
    assert inference[0].parent_span_id, "the inference span has no parent"
    deadline = {a.key: a.value.double_value for a in inference[0].attributes}.get(DEADLINE_ATTRIBUTE)
    assert deadline is not None, "GenerateStream arrived without a deadline"
    assert 0 < deadline < 60


def _open_stream(channel: grpc.aio.Channel, service: str, timeout: float):
    if service == "gateway":
        return gateway_pb2_grpc.GatewayServiceStub(channel).StreamChatCompletion(
            _stream_request(128), metadata=(("authorization", f"Bearer {KEY}"),), timeout=timeout
        )
    return inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream(
        inference_pb2.GenerateStreamRequest(
            model=MODEL,
            messages=[inference_pb2.Message(role="user", content="Count to one hundred.")],
            options=inference_pb2.GenerationOptions(max_tokens=128),
        ),
        timeout=timeout,
    )


async def _abandon(mesh: Mesh, service: str, how: str) -> None:
    """One client that leaves mid-stream: it cancels, closes its channel, or lets its deadline pass."""
    channel = _channel(mesh, service)
    try:
        stream = _open_stream(channel, service, timeout=1.5 if how == "deadline" else 60)
        if how == "cancel-before-first":
            await asyncio.sleep(0.05)
            stream.cancel()
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in stream:
                if how == "cancel":
                    stream.cancel()
                elif how == "close-channel":
                    await channel.close(grace=None)
                if how != "deadline":
                    break
    finally:
        await channel.close(grace=None)


@pytest.mark.parametrize("service", ["gateway", "inference"])
async def test_abandoned_streams_unwind_without_context_errors(traced_mesh, service):
    for how in ("cancel", "cancel-before-first", "close-channel", "deadline"):
        await asyncio.gather(*(_abandon(traced_mesh, service, how) for _ in range(2)))
    await asyncio.sleep(3)  # let the servers notice and unwind (and the garbage collector run)
    async with _channel(traced_mesh, "gateway") as channel:  # still answering
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    log = traced_mesh.log_path(service).read_text(errors="replace")
    assert "Failed to detach context" not in log
    assert "Task exception was never retrieved" not in log


# --- health Watch ------------------------------------------------------------------------------------


@pytest.fixture
def lone_router(tmp_path):
    mesh = Mesh(tmp_path, mesh_environ({"SOPHIA__SERVER__DRAIN_SECONDS": "2"}))
    try:
        mesh.start("router")
        mesh.wait_ready(["router"], 60)
        yield mesh
    finally:
        mesh.stop_all()


async def test_health_watch_streams_serving_then_not_serving_on_sigterm(lone_router):
    async with internal_channel(lone_router, "router") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="sophia.router.v1.RouterService"), timeout=30
        )
        statuses = watch.__aiter__()
        first = await asyncio.wait_for(anext(statuses), 10)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        lone_router.processes["router"].send_signal(signal.SIGTERM)
        second = await asyncio.wait_for(anext(statuses), 10)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    assert await asyncio.to_thread(lone_router.processes["router"].wait, 30) == 0
