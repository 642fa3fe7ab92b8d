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
import gc
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
import uvloop
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry import trace

from libs import deadline
from libs.config import Config, Endpoint
from libs.errors import InvalidArgument, ServiceError
from libs.logs import request_id_var, setup_logging
from libs.reflection import enable_reflection
from libs.telemetry import (
    TRACEPARENT_HEADER,
    SummedHistogram,
    attached_context,
    extract_context,
    setup_telemetry,
    shutdown_telemetry,
    tracing_enabled,
)
from libs.tls import CallerPolicy, Identity, MeshCredentials, TlsError, adopt, load_credentials, peer_identity

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Server span attribute: seconds the caller had left when the RPC arrived (absent: no deadline).
DEADLINE_ATTRIBUTE = "sophia.rpc.deadline_remaining_s"
# Server span attribute: the x-request-id the call arrived with (absent: none).
REQUEST_ID_ATTRIBUTE = "sophia.request_id"


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT.

    A deserializer that raises makes grpc answer UNKNOWN (it has no context to set a status on).
    """

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant_deserializer(deserialize, method: str):
    if deserialize is None:
        return None
    message_type = getattr(deserialize, "__self__", None)
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else f"request of {method}"

    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable(type_name)

    return parse


def _refuse_undecodable(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", f"not a valid {request.type_name}")


class GenericHandlersOnly:
    """The server as the generated `add_*Servicer_to_server` functions see it. They add each service both
    as a generic handler and as "registered methods"; only the generic handler is kept. grpc.aio's serving
    loop keeps one pending call per registered method and waits on all of them for every RPC that arrives
    (`asyncio.wait`: about 14 µs more per RPC at 25 methods than at one, measured); the generic handler
    finds the same method with one dictionary lookup."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        """Not passed on: the same handlers came as a generic handler (see the class docstring)."""


# One per process, however many servers it runs (tests run several).
_RPC_DURATION = SummedHistogram(
    "sophia.server", "rpc.server.duration", unit="ms", description="Duration of inbound RPCs"
)


class _Observed(grpc.aio.ServerInterceptor):
    """Traces, times and logs each RPC and maps ServiceError (and any bug) to a proper status.

    Streaming handlers are run as coroutines that write each response themselves, inside the RPC's own
    task: the span, request id and deadline are set and reset in one context, and a client that goes
    away cancels that task, which closes the handler's generator right there (no generator left for
    the garbage collector to finish in another context).
    """

    def __init__(self) -> None:
        self._tracer = trace.get_tracer("sophia.server")
        self._tracing = tracing_enabled()
        self._duration = _RPC_DURATION
        # Each method's handler, wrapped once: the handlers are fixed once the server runs, and the
        # wrappers read everything about a call from its context (unknown methods are not kept).
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserializer = _tolerant_deserializer(handler.request_deserializer, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _span(
        self, method: str, metadata, request_id: str, time_remaining: float | None
    ) -> contextlib.AbstractContextManager:
        """The RPC's server span; without tracing (no exporter) only the caller's trace context, so that
        it still reaches the services this RPC calls, at none of the cost of a span."""
        if self._tracing:
            attributes = {"rpc.system": "grpc", "rpc.method": method}
            if request_id:
                attributes[REQUEST_ID_ATTRIBUTE] = request_id
            if time_remaining is not None:
                # The caller's deadline as it arrived: shows in a trace whether each hop passed it on.
                attributes[DEADLINE_ATTRIBUTE] = round(time_remaining, 3)
            return self._tracer.start_as_current_span(
                method.lstrip("/"),
                context=extract_context(metadata),
                kind=trace.SpanKind.SERVER,
                attributes=attributes,
            )
        if any(key == TRACEPARENT_HEADER for key, _ in metadata):
            return attached_context(extract_context(metadata))
        return contextlib.nullcontext()

    async def _observed(self, method: str, request, context, handle):
        """Runs `handle(request, context)` with the request id, deadline and trace span of the RPC; errors
        become statuses; the duration is recorded. (A plain coroutine, not an async context manager: that
        is an async generator per call: about a sixth of a small RPC's server CPU, measured.)"""
        started = time.perf_counter()
        metadata = context.invocation_metadata() or ()
        request_id = next((v for k, v in metadata if k == REQUEST_ID_HEADER and isinstance(v, str)), "")
        request_token = request_id_var.set(request_id)
        time_remaining = context.time_remaining()
        deadline_token = deadline.start(time_remaining)
        code = grpc.StatusCode.OK
        try:
            with self._span(method, metadata, request_id, time_remaining):
                try:
                    _refuse_undecodable(request)
                    return await handle(request, context)
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
            await context.abort(exc.code, exc.message, (*exc.trailers, *trailers, *_details_metadata(exc)))
        log.exception("unhandled error in RPC")
        context.set_trailing_metadata(trailers)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id or '-'})")

    def _wrap_unary(self, method, behavior):
        async def unary(request, context):
            return await self._observed(method, request, context, behavior)

        return unary

    def _wrap_stream(self, method, behavior):
        async def write(request, context) -> None:
            await _write_stream(behavior(request, context), context)

        async def stream(request, context) -> None:
            await self._observed(method, request, context, write)

        return stream


async def _write_stream(responses, context) -> None:
    """Writes a server-streaming handler's responses from the RPC's own task, so its context (span,
    request id, deadline) unwinds there when the client goes away."""
    if not inspect.isasyncgen(responses):
        # A handler that writes its responses itself (e.g. grpc.health.v1 Watch).
        await responses
        return
    async with contextlib.aclosing(responses):
        async for response in responses:
            await context.write(response)


def _details_metadata(exc: ServiceError) -> tuple[tuple[str, bytes], ...]:
    """`grpc-status-details-bin` for an error with structured details (a google.rpc.Status whose code
    and message match the call's, as grpcio-status requires)."""
    details = exc.details()
    if not details:
        return ()
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=exc.code.value[0], message=exc.message, details=packed)
    return tuple(rpc_status.to_status(status).trailing_metadata)


class _Authorized(grpc.aio.ServerInterceptor):
    """Refuses with PERMISSION_DENIED every call whose certificate identity the policy does not admit.

    Runs inside _Observed, so refusals are traced and counted like any other outcome.
    """

    def __init__(self, policy: CallerPolicy) -> None:
        self._policy = policy

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._guard_unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Reflection is a bidirectional stream.
        return grpc.stream_stream_rpc_method_handler(
            self._guard_stream(method, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _admit(self, method: str, context) -> None:
        identity = peer_identity(context.auth_context())
        if not self._policy.allows(method, identity):
            caller = repr(identity) if identity else "a caller without a mesh identity"
            log.warning("refused %s: %s may not call it", method, caller)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller} may not call {method}")

    # `request` is the request, or an iterator of requests for client-streaming methods.
    def _guard_unary(self, method, behavior):
        async def unary(request, context):
            await self._admit(method, context)
            return await behavior(request, context)

        return unary

    def _guard_stream(self, method, behavior):
        async def stream(request, context) -> None:
            await self._admit(method, context)
            await _write_stream(behavior(request, context), context)

        return stream


def _bind(
    server: grpc.aio.Server,
    endpoint: Endpoint,
    config: Config,
    credentials: MeshCredentials | None,
    callers: CallerPolicy | None,
) -> None:
    """Internal services (with a caller policy) require client certificates; the public port does not."""
    if credentials is None:
        log.warning("plaintext (tls.mode: plaintext): callers are not authenticated, development only")
        server.add_insecure_port(endpoint.address)
    elif callers is not None:
        server.add_secure_port(endpoint.address, credentials.server(require_client_auth=True))
    elif config.tls.gateway_public_tls:
        server.add_secure_port(endpoint.address, credentials.server(require_client_auth=False))
    else:
        # The public port authenticates API keys; Envoy and `grpcurl -plaintext` reach it as before.
        server.add_insecure_port(endpoint.address)


async def _serve(
    component: str,
    endpoint: Endpoint,
    config: Config,
    register: Callable[[GenericHandlersOnly], Iterable[str]],
    start: Callable[[], Awaitable[None]] | None,
    stop: Callable[[], Awaitable[None]] | None,
    credentials: MeshCredentials | None,
    callers: CallerPolicy | None,
    draining: Callable[[], None] | None,
) -> None:
    limits = config.server
    interceptors: list[grpc.aio.ServerInterceptor] = [_Observed()]
    if credentials is not None and callers is not None:
        interceptors.append(_Authorized(callers))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            # Request metadata above 16 KiB is refused per call; it also bounds what a reply can echo
            # (x-request-id), far below the edge's 60 KiB response-header limit (envoy.template.yaml).
            ("grpc.max_metadata_size", 16 * 1024),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    service_names = list(register(GenericHandlersOnly(server)))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, GenericHandlersOnly(server))
    enable_reflection(server, [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    try:
        _bind(server, endpoint, config, credentials, callers)
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
        # What start-up loaded (models, modules, a rebuilt index) lives as long as the process: out of the
        # collector's sight, a full collection no longer walks it (in the SemanticCache, with torch and
        # transformers loaded, one held every lookup for 250 ms).
        gc.collect()
        gc.freeze()
        for name in ("", *service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s on %s", ", ".join(service_names), endpoint.address)
        await stopping.wait()

    log.info("shutting down: NOT_SERVING, draining in-flight RPCs for up to %.0fs", limits.drain_seconds)
    await health_servicer.enter_graceful_shutdown()
    if draining is not None:
        draining()
    await server.stop(grace=limits.drain_seconds)
    if stop is not None:
        await stop()
    log.info("stopped")


def run_service(
    component: str,
    config: Config,
    register: Callable[[GenericHandlersOnly], Iterable[str]],
    *,
    start: Callable[[], Awaitable[None]] | None = None,
    stop: Callable[[], Awaitable[None]] | None = None,
    callers: CallerPolicy | None = None,
    draining: Callable[[], None] | None = None,
) -> None:
    """Runs one service until SIGTERM. `register` adds servicers and returns their full service names.

    `callers` makes it an internal service: with mTLS it requires a client certificate and admits each
    method only from the identities listed. Without it the port is public (the Gateway: API keys).
    `draining` is called when SIGTERM starts the drain: long-lived streams end there instead of holding
    the drain to its limit.
    """
    setup_logging(component, config.telemetry.log_level)
    setup_telemetry(component, config.telemetry)
    endpoint: Endpoint = getattr(config.services, component)
    try:
        credentials = load_credentials(config.tls, Identity(component))
    except TlsError as exc:
        raise SystemExit(f"{component}: {exc}") from None
    # Every channel this process opens to another service presents the same identity.
    adopt(credentials)
    try:
        # uvloop's event loop roughly halves the per-RPC overhead of the asyncio parts of a call.
        uvloop.run(_serve(component, endpoint, config, register, start, stop, credentials, callers, draining))
    finally:
        shutdown_telemetry()
