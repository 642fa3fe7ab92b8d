"""The MCP server (official `mcp` SDK's MCPServer) and its two transports.

Streamable HTTP is stateless with JSON responses: every POST carries its caller's key and is answered
on its own, so any replica behind the edge can serve any request and a restart loses nothing. Built
from the SDK's parts rather than `streamable_http_app(auth=...)`, which would require an OAuth issuer
and answer an unreachable Gateway with 400: here a missing or bad key gets 401, a Gateway that cannot
check it 503 (429 when the key is over its limit), and `/healthz` answers 200 once the Gateway serves.
"""

from __future__ import annotations

from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.authentication import AuthenticationError
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from services.mcp.access import GatewayKeyVerifier, RoleFilter, TransportRefusal
from services.mcp.gateway import GatewayClient
from services.mcp.tools import CallerSource, SophiaTools, register

MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"
INSTRUCTIONS = (
    "Sophia is an LLM gateway. chat and embed call models through it (billed to your API key's tenant); "
    "explain_route shows how a request would be routed without calling a model; usage_report, "
    "cost_recommendations, provider_health and cache_stats report on your tenant."
)


def build_server(gateway: GatewayClient, caller: CallerSource, default_embedding_model: str) -> MCPServer:
    server = MCPServer("sophia", instructions=INSTRUCTIONS, log_level="WARNING")
    register(server, SophiaTools(gateway, caller, default_embedding_model))
    server.middleware.append(RoleFilter(caller))
    return server


def _refused(status: int, error: str, description: str) -> JSONResponse:
    headers = {"www-authenticate": f'Bearer error="{error}"'} if status == 401 else {}
    if status in (429, 503):
        headers["retry-after"] = "1"
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )


def _auth_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    if isinstance(exc, TransportRefusal):
        return _refused(
            exc.status, "temporarily_unavailable" if exc.status == 503 else "rate_limited", str(exc)
        )
    return _refused(401, "invalid_token", str(exc))


class RequireCaller:
    """Every path but /healthz needs a key the Gateway accepted (set by the authentication middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != HEALTH_PATH:
            if not isinstance(scope.get("user"), AuthenticatedUser):
                reason = "missing API key: send 'Authorization: Bearer <key>'"
                if any(name == b"authorization" for name, _ in scope.get("headers", ())):
                    reason = "invalid API key"
                await _refused(401, "invalid_token", reason)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def http_app(server: MCPServer, gateway: GatewayClient) -> Starlette:
    async def healthz(request: Request) -> Response:
        serving = await gateway.serving()
        return JSONResponse(
            {"gateway": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503
        )

    server.custom_route(HEALTH_PATH, methods=["GET"])(healthz)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        # DNS-rebinding protection guards servers that trust whoever reaches localhost; every request here
        # needs an API key, which a rebound browser page cannot send, and the edge's Host is deployment's.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    # Outermost first: authenticate (Gateway), publish the caller to the tools, refuse the unauthenticated.
    app.user_middleware[:0] = [
        Middleware(
            AuthenticationMiddleware,
            backend=BearerAuthBackend(GatewayKeyVerifier(gateway)),
            on_error=_auth_error,
        ),
        Middleware(AuthContextMiddleware),
        Middleware(RequireCaller),
    ]
    return app
