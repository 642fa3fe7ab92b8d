"""The MCP server's only dependency: the Gateway's public gRPC API, called with the caller's own API key.

Nothing here decides anything the Gateway decides (models, limits, budgets, tenancy): each call carries
`authorization: Bearer <key>`, so the Gateway authenticates it, scopes it to the key's tenant,
rate-limits and accounts it exactly as any other request. A refusal comes back as `GatewayError` with
the gRPC status name and the Gateway's message, which already names the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sophia.gateway.v1 import admin_pb2_grpc, gateway_pb2_grpc, insight_pb2, insight_pb2_grpc

from libs.tls import Identity, ca_path, server_name_options

GATEWAY_SERVICE = "sophia.gateway.v1.GatewayService"


class GatewayError(Exception):
    """The Gateway refused or failed a call: `code` is the gRPC status name, `message` its text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Role(Enum):
    TENANT = "tenant"
    # Admin keys by role: what each may do is the Gateway's to enforce; the tools shown follow it.
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Caller:
    """Who an API key belongs to, as the Gateway says (GetCaller)."""

    role: Role
    tenant_id: str
    key_id: str


_ROLES = {
    insight_pb2.CALLER_ROLE_TENANT: Role.TENANT,
    insight_pb2.CALLER_ROLE_ADMIN: Role.ADMIN,
    insight_pb2.CALLER_ROLE_OPERATOR: Role.OPERATOR,
    insight_pb2.CALLER_ROLE_VIEWER: Role.VIEWER,
}


@dataclass(frozen=True)
class Answer:
    """A reply and the response headers (initial metadata) the Gateway sent with it."""

    message: Any
    headers: dict[str, str]


class GatewayClient:
    """One channel to the Gateway, opened on first use (grpc.aio channels belong to their event loop)."""

    def __init__(self, address: str, timeout_seconds: float, ca_dir: Path | None = None) -> None:
        self._address = address
        self._timeout = timeout_seconds
        # The Gateway's public port speaks TLS when `tls.gateway_public_tls` is on: trust the mesh CA.
        self._ca_dir = ca_dir
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self._ca_dir is None:
                self._channel = grpc.aio.insecure_channel(self._address)
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=ca_path(self._ca_dir).read_bytes()
                )
                self._channel = grpc.aio.secure_channel(
                    self._address, credentials, options=server_name_options(Identity.GATEWAY)
                )
        return self._channel

    @property
    def gateway(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(self._open())

    @property
    def insight(self) -> insight_pb2_grpc.InsightServiceStub:
        return insight_pb2_grpc.InsightServiceStub(self._open())

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self._open())

    async def call(self, method, request, api_key: str) -> Answer:
        """Calls one unary Gateway RPC (a bound stub method) as the holder of `api_key`."""
        try:
            call = method(request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=self._timeout)
            message = await call
            headers = {
                key: value for key, value in (await call.initial_metadata() or ()) if isinstance(value, str)
            }
        except grpc.aio.AioRpcError as exc:
            raise GatewayError(exc.code().name, exc.details() or "") from None
        return Answer(message, headers)

    async def caller(self, api_key: str) -> Caller:
        reply = (await self.call(self.insight.GetCaller, insight_pb2.GetCallerRequest(), api_key)).message
        role = _ROLES.get(reply.role)
        if role is None:
            raise GatewayError("UNKNOWN", f"the gateway answered an unknown caller role {reply.role}")
        return Caller(role=role, tenant_id=reply.tenant_id, key_id=reply.key_id)

    async def serving(self) -> bool:
        """Whether the Gateway's health check answers SERVING."""
        try:
            reply = await health_pb2_grpc.HealthStub(self._open()).Check(
                health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
