"""Client channels to other Sophia services.

Every call gets a deadline derived from the inbound caller's remaining time (less a margin, capped when
the caller set none), carries the request id and the trace context, and is retried on UNAVAILABLE only
when the method is idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from libs import deadline
from libs.config import ClientSettings
from libs.logs import request_id_var
from libs.server import REQUEST_ID_HEADER
from libs.telemetry import inject_context
from libs.tls import adopted, mesh_channel, server_identity

RECONNECT_BACKOFF_INITIAL_MS = 250
RECONNECT_BACKOFF_MAX_MS = 750


class _OutboundDetails:
    """Derives an outbound call's deadline, request id and trace context from the inbound RPC."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = deadline.outbound_timeout(
            margin=self._settings.deadline_margin_seconds, cap=self._settings.default_deadline_seconds
        )
        if details.timeout is not None:
            timeout = min(timeout, details.timeout)
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        request_id = request_id_var.get()
        if request_id and REQUEST_ID_HEADER not in metadata:
            metadata.add(REQUEST_ID_HEADER, request_id)
        for key, value in inject_context({}).items():
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under one kind only (the first base it matches), so each call kind
# gets its own class: one class with both bases would leave streaming calls unintercepted.
class _OutboundUnary(_OutboundDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _OutboundStream(_OutboundDetails, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


# Round robin over every address the name resolves to: behind a headless Kubernetes Service each replica
# is one address, and gRPC's default (pick_first) would send every call to the first one.
_LOAD_BALANCING = [{"round_robin": {}}]


def _service_config(service: str, idempotent_methods: Sequence[str]) -> str:
    if not idempotent_methods:
        return json.dumps({"loadBalancingConfig": _LOAD_BALANCING, "methodConfig": []})
    return json.dumps(
        {
            "loadBalancingConfig": _LOAD_BALANCING,
            "methodConfig": [
                {
                    "name": [{"service": service, "method": method} for method in idempotent_methods],
                    # One quick retry covers a connection that broke under a call (a peer restarting);
                    # a peer that is simply down costs one short backoff, and then the caller's
                    # breaker (libs.breaker) stops calling it: longer backoffs only delayed every
                    # request of an outage.
                    "retryPolicy": {
                        "maxAttempts": 2,
                        "initialBackoff": "0.01s",
                        "maxBackoff": "0.01s",
                        "backoffMultiplier": 1,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def open_channel(
    address: str,
    *,
    service: str,
    idempotent_methods: Sequence[str] = (),
    settings: ClientSettings,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> grpc.aio.Channel:
    """A channel to `service` at `address` that presents this process's mesh certificate (mTLS) and
    accepts only the certificate of the identity serving `service`, whatever the address says."""
    return mesh_channel(
        address,
        adopted(),
        server_identity(service),
        options=[
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(service, idempotent_methods)),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            # Reconnect to a dead peer at least every RECONNECT_BACKOFF_MAX_MS (gRPC's default grows to
            # 120 s), so a dependency that comes back is reachable again within about a second.
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ],
        interceptors=[_OutboundUnary(settings), _OutboundStream(settings)],
    )
