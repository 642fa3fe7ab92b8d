"""The MCP tools: one Gateway RPC each, called with the caller's own API key.

A tool validates only what the Gateway cannot see (which of two arguments was given); everything else is
the Gateway's to check, and its refusal becomes the tool's error ("INVALID_ARGUMENT: max_tokens: must be
at least 1, got -5"), returned to the client as an MCP tool error (`isError`), never a crash.

Which tools a caller sees depends on its key (`TOOLS_BY_ROLE`): a tenant's key gets the tenant's tools,
admin keys their role's (viewers the read-only ones); `access.RoleFilter` hides the others from
tools/list and refuses them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field
from sophia.gateway.v1 import admin_pb2, gateway_pb2, insight_pb2

from services.mcp.gateway import Caller, GatewayClient, GatewayError, Role

# A tool's caller: its API key and who the Gateway says it belongs to.
CallerSource = Callable[[], Awaitable[tuple[str, Caller]]]

TENANT_TOOLS = (
    "chat",
    "embed",
    "list_models",
    "explain_route",
    "usage_report",
    "cost_recommendations",
    "provider_health",
    "cache_stats",
)
VIEWER_TOOLS = ("usage_report", "cost_recommendations", "provider_health")
ADMIN_TOOLS = (*VIEWER_TOOLS, "invalidate_cache", "set_budget")
TOOLS_BY_ROLE = {
    Role.TENANT: frozenset(TENANT_TOOLS),
    Role.ADMIN: frozenset(ADMIN_TOOLS),
    Role.OPERATOR: frozenset(ADMIN_TOOLS),
    Role.VIEWER: frozenset(VIEWER_TOOLS),
}

Preference = Literal["fast", "quality", "code", "balanced"]
GroupBy = Literal["model", "provider", "day", "task_type", "difficulty"]


class ChatTurn(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatAnswer(BaseModel):
    text: str
    finish_reason: str
    model: str = Field(description="The model that answered")
    provider: str
    cache: str = Field(description="hit, miss or bypass")
    cost_usd: float
    attempts: int = Field(description="Models tried; more than 1 means a fallback answered")
    prompt_tokens: int
    completion_tokens: int
    request_id: str


class Embeddings(BaseModel):
    model: str
    vectors: list[list[float]]
    prompt_tokens: int
    cost_usd: float
    request_id: str


def _json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _timestamp(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return timestamp


def _rfc3339(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def _chat_messages(prompt: str | None, messages: list[ChatTurn] | None) -> list[gateway_pb2.ChatMessage]:
    if (prompt is None) == (messages is None):
        raise ToolError("give either prompt or messages (not both, not neither)")
    if messages is None:
        return [gateway_pb2.ChatMessage(role="user", text=prompt)]
    return [gateway_pb2.ChatMessage(role=m.role, text=m.content) for m in messages]


def _chat_params(
    prompt: str | None,
    messages: list[ChatTurn] | None,
    model: str,
    task_type: str,
    model_preference: Preference | None,
    max_tokens: int | None,
) -> gateway_pb2.ChatCompletionParams:
    params = gateway_pb2.ChatCompletionParams(
        model=model,
        messages=_chat_messages(prompt, messages),
        task_type=task_type,
        model_preference=model_preference or "",
    )
    if max_tokens is not None:
        params.max_tokens = max_tokens
    return params


PROMPT = Annotated[str | None, Field(description="The user's message (or give messages)")]
MESSAGES = Annotated[list[ChatTurn] | None, Field(description="The conversation (or give prompt)")]
MODEL = Annotated[str, Field(description='A model id from list_models, or "auto" to let the router choose')]
TASK_TYPE = Annotated[str, Field(description='A task label for routing, e.g. "code" or "summarization"')]
PREFERENCE = Annotated[Preference | None, Field(description="Routing preference (default balanced)")]
MAX_TOKENS = Annotated[int | None, Field(description="The longest answer, in tokens")]
TENANT = Annotated[str | None, Field(description="Admin key only: the tenant (a tenant's key sees its own)")]


class SophiaTools:
    """The tools, bound to one Gateway client and one way of knowing the caller."""

    def __init__(self, gateway: GatewayClient, caller: CallerSource, default_embedding_model: str) -> None:
        self._gateway = gateway
        self._caller = caller
        self._default_embedding_model = default_embedding_model

    async def _call(self, rpc: Callable[[GatewayClient], Any], request: Message):
        key, _ = await self._caller()
        try:
            return await self._gateway.call(rpc(self._gateway), request, key)
        except GatewayError as error:
            raise ToolError(str(error)) from None

    async def _tenant_or_admin(self, tenant_id: str | None) -> tuple[Caller, str]:
        """The tenant a report is about: the key's own (another is refused), or the one the admin names."""
        _, caller = await self._caller()
        if caller.role is not Role.TENANT:
            if not tenant_id:
                raise ToolError("tenant_id: required with an admin key")
            return caller, tenant_id
        if tenant_id and tenant_id != caller.tenant_id:
            raise ToolError("tenant_id: a tenant's key reports on its own tenant only")
        return caller, caller.tenant_id

    # --- a tenant's tools -------------------------------------------------------------------------

    async def chat(
        self,
        prompt: PROMPT = None,
        messages: MESSAGES = None,
        model: MODEL = "auto",
        task_type: TASK_TYPE = "",
        model_preference: PREFERENCE = None,
        max_tokens: MAX_TOKENS = None,
    ) -> ChatAnswer:
        """Chat through the gateway; returns the answer and which model, provider, cache status and cost."""
        params = _chat_params(prompt, messages, model, task_type, model_preference, max_tokens)
        answer = await self._call(
            lambda g: g.gateway.CreateChatCompletion, gateway_pb2.CreateChatCompletionRequest(params=params)
        )
        reply, headers = answer.message, answer.headers
        choice = reply.choices[0]
        return ChatAnswer(
            text=choice.message.content,
            finish_reason=choice.finish_reason,
            model=headers.get("x-sophia-model", reply.model),
            provider=headers.get("x-sophia-provider", ""),
            cache=headers.get("x-sophia-cache", ""),
            cost_usd=float(headers.get("x-sophia-cost-usd", "0")),
            attempts=int(headers.get("x-sophia-attempts", "1")),
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
            request_id=headers.get("x-request-id", ""),
        )

    async def embed(
        self,
        texts: Annotated[list[str], Field(description="The texts to embed", min_length=1)],
        model: Annotated[
            str | None, Field(description="An embedding model id (default: the configured one)")
        ] = None,
    ) -> Embeddings:
        """Embed texts through the gateway; returns one vector per text, the tokens and the cost."""
        chosen = model or self._default_embedding_model
        answer = await self._call(
            lambda g: g.gateway.CreateEmbeddings,
            gateway_pb2.CreateEmbeddingsRequest(model=chosen, texts=texts),
        )
        reply, headers = answer.message, answer.headers
        return Embeddings(
            model=reply.model,
            vectors=[list(item.vector) for item in reply.data],
            prompt_tokens=reply.usage.prompt_tokens,
            cost_usd=float(headers.get("x-sophia-cost-usd", "0")),
            request_id=headers.get("x-request-id", ""),
        )

    async def list_models(self) -> dict[str, Any]:
        """List the models the gateway serves ("auto" first), with their kind and context window."""
        answer = await self._call(lambda g: g.gateway.ListModels, gateway_pb2.ListModelsRequest())
        return {"models": [_json(model) for model in answer.message.data]}

    async def explain_route(
        self,
        prompt: PROMPT = None,
        messages: MESSAGES = None,
        model: MODEL = "auto",
        task_type: TASK_TYPE = "",
        model_preference: PREFERENCE = None,
        max_tokens: MAX_TOKENS = None,
    ) -> dict[str, Any]:
        """Show which models the router would try for this request, in order, and why, without calling any."""
        params = _chat_params(prompt, messages, model, task_type, model_preference, max_tokens)
        answer = await self._call(
            lambda g: g.insight.ExplainRoute, insight_pb2.ExplainRouteRequest(params=params)
        )
        return _json(answer.message)

    async def usage_report(
        self,
        start: Annotated[
            datetime | None, Field(description="From (RFC 3339; default: this UTC month)")
        ] = None,
        end: Annotated[
            datetime | None, Field(description="Until, excluded (default: this month's end)")
        ] = None,
        group_by: Annotated[GroupBy, Field(description="How to group the rows")] = "model",
        tenant_id: TENANT = None,
    ) -> dict[str, Any]:
        """Report the tenant's requests, tokens and cost over a period, grouped by model, provider or day."""
        caller, tenant = await self._tenant_or_admin(tenant_id)
        if caller.role is not Role.TENANT:
            request = admin_pb2.GetUsageRequest(
                tenant_id=tenant, start_time=_rfc3339(start), end_time=_rfc3339(end), group_by=group_by
            )
            return _json((await self._call(lambda g: g.admin.GetUsage, request)).message)
        request = insight_pb2.GetTenantUsageRequest(group_by=group_by)
        if start is not None:
            request.start_time.CopyFrom(_timestamp(start))
        if end is not None:
            request.end_time.CopyFrom(_timestamp(end))
        return _json((await self._call(lambda g: g.insight.GetTenantUsage, request)).message)

    async def cost_recommendations(self, tenant_id: TENANT = None) -> dict[str, Any]:
        """Cost advice from the tenant's recorded usage, each with its evidence and monthly saving."""
        caller, tenant = await self._tenant_or_admin(tenant_id)
        if caller.role is not Role.TENANT:
            request = admin_pb2.GetRecommendationsRequest(tenant_id=tenant)
            return _json((await self._call(lambda g: g.admin.GetRecommendations, request)).message)
        request = insight_pb2.GetTenantRecommendationsRequest()
        return _json((await self._call(lambda g: g.insight.GetTenantRecommendations, request)).message)

    async def provider_health(self) -> dict[str, Any]:
        """Show each provider's and model's recent successes, failures, error rate and median latency."""
        answer = await self._call(
            lambda g: g.insight.GetProviderHealth, insight_pb2.GetProviderHealthRequest()
        )
        return _json(answer.message)

    async def cache_stats(self) -> dict[str, Any]:
        """Show the response cache's hits, misses, entries and hit rate for the caller's tenant."""
        answer = await self._call(lambda g: g.insight.GetCacheStats, insight_pb2.GetCacheStatsRequest())
        return _json(answer.message)

    # --- the admin key's tools --------------------------------------------------------------------

    async def invalidate_cache(
        self,
        tenant_id: Annotated[str, Field(description="The tenant whose cached answers to drop")],
        model: Annotated[str, Field(description="Only this model's (default: every model)")] = "",
    ) -> dict[str, Any]:
        """Admin: drop a tenant's cached answers, for one model or all of them."""
        request = admin_pb2.InvalidateCacheRequest(tenant_id=tenant_id, model=model)
        return _json((await self._call(lambda g: g.admin.InvalidateCache, request)).message)

    async def set_budget(
        self,
        tenant_id: Annotated[str, Field(description="The tenant")],
        monthly_limit_usd: Annotated[
            float, Field(description="US dollars per UTC month; 0 removes the limit")
        ],
        alert_percentages: Annotated[
            list[int], Field(description="Alert at these percentages of the limit (default 50, 80, 100)")
        ] = [],  # noqa: B006 (pydantic copies defaults; never mutated)
        hard_stop: Annotated[bool, Field(description="Refuse requests once the limit is reached")] = False,
    ) -> dict[str, Any]:
        """Admin: set a tenant's monthly budget, its alert percentages and whether it stops requests."""
        request = admin_pb2.SetBudgetRequest(
            tenant_id=tenant_id,
            monthly_limit_usd=monthly_limit_usd,
            alert_percentages=alert_percentages,
            hard_stop=hard_stop,
        )
        return _json((await self._call(lambda g: g.admin.SetBudget, request)).message)


# Hints for clients that ask before running a tool: what only reads, what changes state.
_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_CHANGES = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)


def register(server: MCPServer, tools: SophiaTools) -> None:
    """Adds every tool to `server`; descriptions are the methods' one-line docstrings."""
    for name in dict.fromkeys((*TENANT_TOOLS, *ADMIN_TOOLS)):
        annotations = None
        if name in ("invalidate_cache", "set_budget"):
            annotations = _CHANGES
        elif name not in ("chat", "embed"):
            annotations = _READ_ONLY
        server.add_tool(getattr(tools, name), name=name, annotations=annotations)
