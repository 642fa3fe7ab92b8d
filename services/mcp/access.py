"""Who is calling, and which tools they see.

Over streamable HTTP the key is the request's `Authorization: Bearer` header: `GatewayKeyVerifier`
asks the Gateway who it belongs to (InsightService.GetCaller) before the request reaches the MCP
session, so a missing or bad key gets 401 and no tool runs. Over stdio the key is `SOPHIA_API_KEY`,
checked with the Gateway when the first request needs it. Either way `RoleFilter` shows a caller only
its role's tools, and refuses the others as unknown.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_REQUEST, CallToolResult, ListToolsResult, TextContent
from starlette.authentication import AuthenticationError

from services.mcp.gateway import Caller, GatewayClient, GatewayError, Role
from services.mcp.tools import TOOLS_BY_ROLE

# A key the Gateway accepted is trusted this long before it is asked again (it remembers keys that long
# itself, gateway.key_cache_seconds); a refused key is never remembered.
KEY_CACHE_SECONDS = 5.0
MAX_REMEMBERED_KEYS = 10_000
_CALLER_CLAIM = "sophia_caller"


class TransportRefusal(AuthenticationError):
    """The key could not be checked: the HTTP status says why (429 over the limit, 503 Gateway down)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class GatewayKeyVerifier(TokenVerifier):
    def __init__(self, gateway: GatewayClient, clock=time.monotonic) -> None:
        self._gateway = gateway
        self._clock = clock
        self._known: OrderedDict[str, tuple[float, Caller]] = OrderedDict()

    async def verify_token(self, token: str) -> AccessToken | None:
        digest = _digest(token)
        known = self._known.get(digest)
        if known is not None and self._clock() < known[0]:
            caller = known[1]
        else:
            try:
                caller = await self._gateway.caller(token)
            except GatewayError as error:
                if error.code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
                    return None  # → 401
                if error.code == "RESOURCE_EXHAUSTED":
                    raise TransportRefusal(429, error.message) from None
                raise TransportRefusal(503, f"the gateway could not check the key: {error}") from None
            self._known[digest] = (self._clock() + KEY_CACHE_SECONDS, caller)
            self._known.move_to_end(digest)
            while len(self._known) > MAX_REMEMBERED_KEYS:
                self._known.popitem(last=False)
        return AccessToken(
            token=token,
            client_id=caller.key_id,
            scopes=[caller.role.value],
            claims={_CALLER_CLAIM: {"role": caller.role.value, "tenant_id": caller.tenant_id}},
        )


async def http_caller() -> tuple[str, Caller]:
    """The caller of the HTTP request being served (the transport has verified its key)."""
    token = get_access_token()
    if token is None:
        raise MCPError(INVALID_REQUEST, "no authenticated caller")
    claim = (token.claims or {})[_CALLER_CLAIM]
    return token.token, Caller(role=Role(claim["role"]), tenant_id=claim["tenant_id"], key_id=token.client_id)


class StdioCaller:
    """The key from the environment; checked with the Gateway at first use, then remembered."""

    def __init__(self, gateway: GatewayClient, key: str) -> None:
        self._gateway = gateway
        self._key = key
        self._caller: Caller | None = None

    async def __call__(self) -> tuple[str, Caller]:
        if not self._key:
            raise MCPError(INVALID_REQUEST, "no API key: set SOPHIA_API_KEY in the MCP server's environment")
        if self._caller is None:
            try:
                self._caller = await self._gateway.caller(self._key)
            except GatewayError as error:
                raise MCPError(INVALID_REQUEST, f"the gateway refused SOPHIA_API_KEY: {error}") from None
        return self._key, self._caller


class RoleFilter:
    """Server middleware: tools/list shows the caller's role's tools only; tools/call of another is refused
    exactly as an unknown tool is, so a tenant's key cannot tell the admin tools exist."""

    def __init__(self, caller) -> None:
        self._caller = caller

    async def __call__(self, ctx: ServerRequestContext, call_next: CallNext) -> HandlerResult:
        if ctx.method not in ("tools/list", "tools/call"):
            return await call_next(ctx)
        _, caller = await self._caller()
        allowed = TOOLS_BY_ROLE[caller.role]
        if ctx.method == "tools/call":
            name = (ctx.params or {}).get("name")
            if name not in allowed:
                return CallToolResult(
                    content=[TextContent(type="text", text=f"Unknown tool: {name}")], is_error=True
                )
            return await call_next(ctx)
        result = await call_next(ctx)
        if isinstance(result, ListToolsResult):
            return result.model_copy(
                update={"tools": [tool for tool in result.tools if tool.name in allowed]}
            )
        if isinstance(result, dict):
            return {
                **result,
                "tools": [tool for tool in result.get("tools", []) if tool.get("name") in allowed],
            }
        return result
