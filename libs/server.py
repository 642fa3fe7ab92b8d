"""gRPC server bootstrap shared by every service.

`run_service` gives each service the same life cycle: bind the port, answer health checks with
NOT_SERVING while `start` loads models or dependencies, then SERVING; serve reflection; trace, time and
log every RPC; turn domain errors into gRPC statuses (never a stack trace); shed load beyond
`server.max_concurrent_rpcs`; and on SIGTERM/SIGINT flip health to NOT_SERVING, stop accepting, drain
in-flight RPCs (streams included) for up to `server.drain_seconds`, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import metrics, trace

from libs import deadline
from libs.config import Config, Endpoint
from libs.errors import ServiceError
from libs.logs import request_id_var, setup_logging
from libs.telemetry import extract_context, setup_telemetry, shutdown_telemetry

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


class _Observed(grpc.aio.ServerInterceptor):
    """Traces, times and logs each RPC and maps ServiceError (and any bug) to a proper status."""

    def __init__(self) -> None:
        self._tracer = trace.get_tracer("sophia.server")
        self._duration = metrics.get_meter("sophia.server").create_histogram(
            "rpc.server.duration", unit="ms", description="Duration of inbound RPCs"
        )

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, metadata, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, metadata, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    @contextlib.asynccontextmanager
    async def _observed(self, method: str, metadata, context):
        """Request id, deadline and trace span around one RPC; errors become statuses; duration recorded."""
        started = time.perf_counter()
        request_id = next((v for k, v in metadata if k == REQUEST_ID_HEADER and isinstance(v, str)), "")
        request_token = request_id_var.set(request_id)
        deadline_token = deadline.start(context.time_remaining())
        code = grpc.StatusCode.OK
        try:
            with self._tracer.start_as_current_span(
                method.lstrip("/"),
                context=extract_context(metadata),
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method},
            ):
                try:
                    yield
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    code = exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL
                    await self._fail(context, exc)
        finally:
            final = context.code() if isinstance(context.code(), grpc.StatusCode) else code
            self._duration.record(
                (time.perf_counter() - started) * 1000,
                {"rpc.method": method, "rpc.grpc.status_code": final.name},
            )
            request_id_var.reset(request_token)
            deadline.reset(deadline_token)

    async def _fail(self, context, exc: Exception) -> None:
        request_id = request_id_var.get()
        trailers = ((REQUEST_ID_HEADER, request_id),) if request_id else ()
        if isinstance(exc, ServiceError):
            context.set_trailing_metadata((*exc.trailers, *trailers))
            await context.abort(exc.code, exc.message)
        log.exception("unhandled error in RPC")
        context.set_trailing_metadata(trailers)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id or '-'})")

    def _wrap_unary(self, method, metadata, behavior):
        async def unary(request, context):
            async with self._observed(method, metadata, context):
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, method, metadata, behavior):
        async def stream(request, context):
            async with self._observed(method, metadata, context):
                async for response in behavior(request, context):
                    yield response

        return stream


async def _serve(
    component: str,
    endpoint: Endpoint,
    config: Config,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    start: Callable[[], Awaitable[None]] | None,
    stop: Callable[[], Awaitable[None]] | None,
) -> None:
    limits = config.server
    server = grpc.aio.server(
        interceptors=[_Observed()],
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    service_names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    try:
        server.add_insecure_port(endpoint.address)
    except RuntimeError:
        raise SystemExit(f"{component}: cannot listen on {endpoint.address} (port in use?)") from None
    await server.start()
    log.info("listening on %s (NOT_SERVING until ready)", endpoint.address)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    if start is not None:
        starting = asyncio.create_task(start())
        await asyncio.wait(
            [starting, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if not starting.done():
            starting.cancel()
        elif starting.exception() is not None:
            log.error("start-up failed: %s", starting.exception(), exc_info=starting.exception())
            await server.stop(grace=0)
            raise SystemExit(1)
    if not stopping.is_set():
        for name in ("", *service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s on %s", ", ".join(service_names), endpoint.address)
        await stopping.wait()

    log.info("shutting down: NOT_SERVING, draining in-flight RPCs for up to %.0fs", limits.drain_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=limits.drain_seconds)
    if stop is not None:
        await stop()
    log.info("stopped")


def run_service(
    component: str,
    config: Config,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    start: Callable[[], Awaitable[None]] | None = None,
    stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Runs one service until SIGTERM. `register` adds servicers and returns their full service names."""
    setup_logging(component, config.telemetry.log_level)
    setup_telemetry(component, config.telemetry)
    endpoint: Endpoint = getattr(config.services, component)
    try:
        # uvloop's event loop roughly halves the per-RPC overhead of the asyncio parts of a call.
        uvloop.run(_serve(component, endpoint, config, register, start, stop))
    finally:
        shutdown_telemetry()
