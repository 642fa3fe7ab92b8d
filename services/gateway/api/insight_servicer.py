"""InsightService: what a caller may learn with its own key (REST under /v1/insight, gRPC, MCP tools).

A thin servicer: it authenticates the key and counts the call against the key's requests per minute, as
every public RPC does, then asks the service that knows — the Router's plan (through the Gateway's own
`Routing`, so the Router being down gives the Gateway's fallback plan, marked as such), the CostLedger's
usage reports and recommendations, the Router's health feed, the cache's counters — and converts the
answer for the public API (micro-dollars to dollars, 64-bit counters to the API's 32-bit ones).

The conversions of the internal answers live here, one function per message, so that new fields of the
Router's plan (task type, difficulty, confidence) and of the cache's Stats (hits by layer, vetoes) are
added in one place; AdminService uses the recommendation conversion too.
"""

from __future__ import annotations

import grpc
from sophia.cache.v1 import cache_pb2, cache_pb2_grpc
from sophia.gateway.v1 import insight_pb2 as pb
from sophia.gateway.v1 import insight_pb2_grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from sophia.router.v1 import router_pb2, router_pb2_grpc

from libs.errors import (
    InvalidArgument,
    ServiceError,
    Unavailable,
    field_violations,
)
from libs.logs import request_id_var
from libs.pricing import MICROS_PER_USD, token_cost_micros
from services.gateway.access.control import AccessControl
from services.gateway.access.roles import Role
from services.gateway.api import translate
from services.gateway.domain import Principal
from services.gateway.serving.request_flow import DEFAULT_COMPLETION_ESTIMATE
from services.gateway.serving.router_client import Routing

# Reads for people and agents, off the request path: they may wait a little longer than routing does.
DEPENDENCY_TIMEOUT_SECONDS = 10.0
INT32_MAX = 2**31 - 1
_CALLER_ROLES = {
    Role.ADMIN: pb.CALLER_ROLE_ADMIN,
    Role.OPERATOR: pb.CALLER_ROLE_OPERATOR,
    Role.VIEWER: pb.CALLER_ROLE_VIEWER,
}
GROUP_BY = {
    "": ledger_pb2.GROUP_BY_MODEL,
    "model": ledger_pb2.GROUP_BY_MODEL,
    "provider": ledger_pb2.GROUP_BY_PROVIDER,
    "day": ledger_pb2.GROUP_BY_DAY,
    "task_type": ledger_pb2.GROUP_BY_TASK_TYPE,
    "difficulty": ledger_pb2.GROUP_BY_DIFFICULTY,
}
RECOMMENDATION_KINDS = {
    ledger_pb2.RECOMMENDATION_KIND_CHEAPER_MODEL: pb.RECOMMENDATION_KIND_CHEAPER_MODEL,
    ledger_pb2.RECOMMENDATION_KIND_REPEATED_PROMPTS: pb.RECOMMENDATION_KIND_REPEATED_PROMPTS,
    ledger_pb2.RECOMMENDATION_KIND_BUDGET_PROJECTION: pb.RECOMMENDATION_KIND_BUDGET_PROJECTION,
    ledger_pb2.RECOMMENDATION_KIND_FREQUENT_FALLBACK: pb.RECOMMENDATION_KIND_FREQUENT_FALLBACK,
}
DIFFICULTIES = {
    ledger_pb2.DIFFICULTY_UNSPECIFIED: pb.DIFFICULTY_UNSPECIFIED,
    ledger_pb2.DIFFICULTY_SIMPLE: pb.DIFFICULTY_SIMPLE,
    ledger_pb2.DIFFICULTY_COMPLEX: pb.DIFFICULTY_COMPLEX,
}


def dependency_failure(what: str, exc: grpc.aio.AioRpcError) -> ServiceError:
    """The dependency's own INVALID_ARGUMENT names our field too; anything else is it being unavailable."""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(exc)
        return (
            InvalidArgument(*violations[0]) if violations else InvalidArgument("request", exc.details() or "")
        )
    return Unavailable(f"{what} is unavailable ({exc.code().name}); try again shortly")


def usd(micros: int) -> float:
    return micros / MICROS_PER_USD


def _int32(value: int) -> int:
    # The public counters are int32 (JSON numbers at the edge); a larger count shows as the maximum.
    return min(value, INT32_MAX)


def group_by(value: str) -> int:
    try:
        return GROUP_BY[value]
    except KeyError:
        raise InvalidArgument(
            "group_by", 'must be "model", "provider", "day", "task_type" or "difficulty"'
        ) from None


def usage_row(row: ledger_pb2.UsageRow) -> pb.TenantUsageRow:
    return pb.TenantUsageRow(
        key=row.key,
        requests=_int32(row.requests),
        input_tokens=_int32(row.input_tokens),
        output_tokens=_int32(row.output_tokens),
        cost_usd=usd(row.cost_micros),
    )


def budget_projection(projection: ledger_pb2.BudgetProjection) -> pb.BudgetProjection:
    return pb.BudgetProjection(
        month=projection.month,
        spent_usd=usd(projection.spent_micros),
        limit_usd=usd(projection.limit_micros),
        linear_usd=usd(projection.linear_micros),
        trend_usd=usd(projection.trend_micros),
    )


def _evidence(evidence: ledger_pb2.UsageEvidence) -> pb.UsageEvidence:
    return pb.UsageEvidence(
        request_id=evidence.request_id,
        model_id=evidence.model_id,
        occurred_at=evidence.occurred_at,
        cost_usd=usd(evidence.cost_micros),
        input_tokens=evidence.input_tokens,
        output_tokens=evidence.output_tokens,
    )


def _recommendation(recommendation: ledger_pb2.Recommendation) -> pb.Recommendation:
    converted = pb.Recommendation(
        kind=RECOMMENDATION_KINDS.get(recommendation.kind, pb.RECOMMENDATION_KIND_UNSPECIFIED),
        summary=recommendation.summary,
        estimated_monthly_saving_usd=usd(recommendation.estimated_monthly_saving_micros),
        evidence_count=_int32(recommendation.evidence_count),
        evidence=[_evidence(row) for row in recommendation.evidence],
        model_id=recommendation.model_id,
        alternative_model_id=recommendation.alternative_model_id,
        task_type=recommendation.task_type,
        difficulty=DIFFICULTIES.get(recommendation.difficulty, pb.DIFFICULTY_UNSPECIFIED),
        requests=_int32(recommendation.requests),
    )
    if recommendation.HasField("projection"):
        converted.projection.CopyFrom(budget_projection(recommendation.projection))
    return converted


def recommendation_fields(reply: ledger_pb2.GetRecommendationsResponse) -> dict:
    """The fields the tenant's and the admin's recommendation answers share, converted."""
    return {
        "recommendations": [_recommendation(r) for r in reply.recommendations],
        "window_start": reply.window_start,
        "window_end": reply.window_end,
        "projection": budget_projection(reply.projection),
    }


async def ledger_recommendations(
    ledger: ledger_pb2_grpc.LedgerServiceStub, tenant_id: str
) -> ledger_pb2.GetRecommendationsResponse:
    try:
        return await ledger.GetRecommendations(
            ledger_pb2.GetRecommendationsRequest(tenant_id=tenant_id), timeout=DEPENDENCY_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        raise dependency_failure("the cost ledger", exc) from None


def _provider_health(health: router_pb2.ProviderHealth) -> pb.ProviderHealth:
    return pb.ProviderHealth(
        provider=health.provider,
        model_id=health.model_id,
        successes=health.successes,
        failures=health.failures,
        error_rate=health.error_rate,
        p50_latency_ms=health.p50_latency_ms,
    )


def _cache_stats(tenant_id: str, stats: cache_pb2.StatsResponse) -> pb.GetCacheStatsResponse:
    lookups = stats.hits + stats.misses
    return pb.GetCacheStatsResponse(
        tenant_id=tenant_id,
        hits=stats.hits,
        misses=stats.misses,
        entries=stats.entries,
        hit_rate=stats.hits / lookups if lookups else 0.0,
    )


class InsightServicer(insight_pb2_grpc.InsightServiceServicer):
    def __init__(
        self,
        access: AccessControl,
        routing: Routing,
        ledger: ledger_pb2_grpc.LedgerServiceStub,
        cache: cache_pb2_grpc.CacheServiceStub,
        router: router_pb2_grpc.RouterServiceStub,
    ) -> None:
        self._access = access
        self._routing = routing
        self._ledger = ledger
        self._cache = cache
        self._router = router

    async def _tenant(self, context) -> Principal:
        """The caller's tenant key, counted against its requests per minute like any public RPC."""
        principal = await self._access.authenticate(tuple(context.invocation_metadata() or ()))
        await self._access.admit(principal, 0)
        await self._answer_request_id(context)
        return principal

    @staticmethod
    async def _answer_request_id(context) -> None:
        request_id = request_id_var.get()
        if request_id:
            await context.send_initial_metadata((("x-request-id", request_id),))

    async def _identify(self, context) -> Principal | None:
        """The tenant key's principal, or None for an admin key; Unauthenticated for neither."""
        key = await self._access.identify(tuple(context.invocation_metadata() or ()))
        return None if key.role is not None else key.principal

    async def GetCaller(self, request, context):
        # Authentication only, not counted against the key's limits: the MCP server asks it to check a
        # key before it runs the tool, whose own Gateway call is then counted.
        key = await self._access.identify(tuple(context.invocation_metadata() or ()))
        await self._answer_request_id(context)
        if key.role is not None:
            return pb.GetCallerResponse(role=_CALLER_ROLES[key.role], key_id=key.key_id, tenants=key.tenants)
        return pb.GetCallerResponse(role=pb.CALLER_ROLE_TENANT, tenant_id=key.tenant_id, key_id=key.key_id)

    async def ExplainRoute(self, request, context):
        principal = await self._tenant(context)
        chat = translate.chat_request(request.params)
        self._routing.check_model(chat.model, "chat")
        prompt_tokens = chat.estimated_prompt_tokens()
        completion_tokens = chat.max_tokens or DEFAULT_COMPLETION_ESTIMATE
        plan = await self._routing.plan(
            chat, principal.tenant_id, request_id_var.get(), prompt_tokens + completion_tokens
        )
        try:
            prices = await self._ledger.ListPrices(
                ledger_pb2.ListPricesRequest(), timeout=DEPENDENCY_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            raise dependency_failure("the cost ledger", exc) from None
        price_of = {price.model_id: price for price in prices.prices}

        def cost(model_id: str) -> float:
            price = price_of.get(model_id)
            if price is None:
                return 0.0  # unpriced (local) models cost nothing, as the ledger charges them
            return usd(
                token_cost_micros(prompt_tokens, price.input_micros_per_mtok)
                + token_cost_micros(completion_tokens, price.output_micros_per_mtok)
            )

        return pb.ExplainRouteResponse(
            targets=[
                pb.RouteCandidate(
                    model_id=target.model_id,
                    provider=target.provider,
                    estimated_cost_usd=cost(target.model_id),
                )
                for target in plan.targets
            ],
            reason=plan.reason,
            estimated_prompt_tokens=_int32(prompt_tokens),
            estimated_completion_tokens=_int32(completion_tokens),
        )

    async def GetTenantUsage(self, request, context):
        principal = await self._tenant(context)
        forwarded = ledger_pb2.GetUsageReportRequest(
            tenant_id=principal.tenant_id, group_by=group_by(request.group_by)
        )
        for field in ("start_time", "end_time"):
            if request.HasField(field):
                getattr(forwarded, field).CopyFrom(getattr(request, field))
        try:
            report = await self._ledger.GetUsageReport(forwarded, timeout=DEPENDENCY_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise dependency_failure("the cost ledger", exc) from None
        return pb.GetTenantUsageResponse(
            tenant_id=principal.tenant_id,
            rows=[usage_row(row) for row in report.rows],
            total=usage_row(report.total),
        )

    async def GetTenantRecommendations(self, request, context):
        principal = await self._tenant(context)
        reply = await ledger_recommendations(self._ledger, principal.tenant_id)
        return pb.GetTenantRecommendationsResponse(
            tenant_id=principal.tenant_id, **recommendation_fields(reply)
        )

    async def GetProviderHealth(self, request, context):
        principal = await self._identify(context)
        if principal is not None:
            await self._access.admit(principal, 0)
        await self._answer_request_id(context)
        try:
            health = await self._router.GetProviderHealth(
                router_pb2.GetProviderHealthRequest(), timeout=DEPENDENCY_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            raise dependency_failure("the router", exc) from None
        return pb.GetProviderHealthResponse(providers=[_provider_health(p) for p in health.providers])

    async def GetCacheStats(self, request, context):
        principal = await self._tenant(context)
        try:
            stats = await self._cache.Stats(
                cache_pb2.StatsRequest(tenant_id=principal.tenant_id), timeout=DEPENDENCY_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            raise dependency_failure("the cache", exc) from None
        return _cache_stats(principal.tenant_id, stats)
