"""AdminService (REST under /admin/v1 through the edge): API keys, budgets, usage, recommendations and
cache invalidation, admin key only.

Keys are managed by `AccessControl`; budgets and usage belong to the CostLedger, which this forwards to,
converting US dollars to and from the ledger's integer micro-dollars.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sophia.cache.v1 import cache_pb2, cache_pb2_grpc
from sophia.gateway.v1 import admin_pb2 as pb
from sophia.gateway.v1 import admin_pb2_grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from libs.errors import InvalidArgument, ServiceError, Unavailable, field_violations
from libs.pricing import MICROS_PER_USD, usd_to_micros
from services.gateway.access.api_keys import ApiKey
from services.gateway.access.control import AccessControl
from services.gateway.api.insight_servicer import (
    DEPENDENCY_TIMEOUT_SECONDS,
    dependency_failure,
    ledger_recommendations,
    recommendation_fields,
)

TENANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_KEY_NAME_LENGTH = 128
MAX_KEY_ID_LENGTH = 128
MAX_MODEL_ID_LENGTH = 256
MAX_MONTHLY_LIMIT_USD = 1_000_000_000
# RFC 3339 date-time (the ISO 8601 profile with a mandatory offset); fromisoformat does the rest.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
GROUP_BY = {
    "": ledger_pb2.GROUP_BY_MODEL,
    "model": ledger_pb2.GROUP_BY_MODEL,
    "provider": ledger_pb2.GROUP_BY_PROVIDER,
    "day": ledger_pb2.GROUP_BY_DAY,
}
LEDGER_TIMEOUT_SECONDS = 10.0
INT32_MAX = 2**31 - 1


def validate_tenant_id(tenant_id: str) -> None:
    if not tenant_id:
        raise InvalidArgument("tenant_id", "must not be empty")
    if not TENANT_ID.fullmatch(tenant_id):
        raise InvalidArgument("tenant_id", "must be 1 to 64 characters of A-Z a-z 0-9 _ . -")


def validate_new_key(tenant_id: str, name: str, requests_per_minute: int, tokens_per_minute: int) -> None:
    validate_tenant_id(tenant_id)
    if len(name) > MAX_KEY_NAME_LENGTH:
        raise InvalidArgument("name", f"must be at most {MAX_KEY_NAME_LENGTH} characters")
    if requests_per_minute < 0:
        raise InvalidArgument("requests_per_minute", "must not be negative (0 means unlimited)")
    if tokens_per_minute < 0:
        raise InvalidArgument("tokens_per_minute", "must not be negative (0 means unlimited)")


def monthly_limit_micros(usd: float) -> int:
    if not math.isfinite(usd) or usd < 0:
        raise InvalidArgument("monthly_limit_usd", "must be a finite number of dollars, 0 or more")
    if usd > MAX_MONTHLY_LIMIT_USD:
        raise InvalidArgument("monthly_limit_usd", f"must be at most {MAX_MONTHLY_LIMIT_USD}")
    return usd_to_micros(usd)


def parse_time(field: str, value: str) -> Timestamp | None:
    """An RFC 3339 time as a protobuf Timestamp; None when empty (the ledger then uses the current month)."""
    if not value:
        return None
    if not RFC3339.fullmatch(value):
        raise InvalidArgument(field, "must be an RFC 3339 time with an offset, e.g. 2025-01-31T00:00:00Z")
    try:
        moment = datetime.fromisoformat(value.upper())
        timestamp = Timestamp()
        timestamp.FromDatetime(moment)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid date and time") from None
    return timestamp


def group_by(value: str) -> int:
    try:
        return GROUP_BY[value]
    except KeyError:
        raise InvalidArgument("group_by", 'must be "model", "provider" or "day"') from None


def _ledger_failure(exc: grpc.aio.AioRpcError) -> ServiceError:
    """The ledger's own INVALID_ARGUMENT names our field too; anything else is the ledger being down."""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(exc)
        if violations:
            return InvalidArgument(*violations[0])
        return InvalidArgument("request", exc.details() or "rejected by the ledger")
    return Unavailable(f"the cost ledger is unavailable ({exc.code().name}); try again shortly")


def _api_key(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=key.key_id,
        tenant_id=key.tenant_id,
        name=key.name,
        requests_per_minute=key.requests_per_minute,
        tokens_per_minute=key.tokens_per_minute,
        created=key.created,
        revoked=key.revoked,
    )


def _usage_row(row: ledger_pb2.UsageRow) -> pb.UsageRow:
    # The admin API's counters are int32 (JSON numbers at the edge); a larger count shows as the maximum.
    return pb.UsageRow(
        key=row.key,
        requests=min(row.requests, INT32_MAX),
        input_tokens=min(row.input_tokens, INT32_MAX),
        output_tokens=min(row.output_tokens, INT32_MAX),
        cost_usd=row.cost_micros / MICROS_PER_USD,
    )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        access: AccessControl,
        ledger: ledger_pb2_grpc.LedgerServiceStub,
        cache: cache_pb2_grpc.CacheServiceStub,
    ) -> None:
        self._access = access
        self._ledger = ledger
        self._cache = cache

    async def _admin(self, context) -> None:
        await self._access.authenticate_admin(tuple(context.invocation_metadata() or ()))

    async def CreateApiKey(self, request, context):
        await self._admin(context)
        validate_new_key(
            request.tenant_id, request.name, request.requests_per_minute, request.tokens_per_minute
        )
        key, secret = await self._access.create_key(
            request.tenant_id, request.name, request.requests_per_minute, request.tokens_per_minute
        )
        return pb.CreateApiKeyResponse(key=_api_key(key), secret=secret)

    async def ListApiKeys(self, request, context):
        await self._admin(context)
        if request.tenant_id:
            validate_tenant_id(request.tenant_id)
        keys = await self._access.list_keys(request.tenant_id)
        return pb.ListApiKeysResponse(keys=[_api_key(key) for key in keys])

    async def RevokeApiKey(self, request, context):
        await self._admin(context)
        if not request.key_id:
            raise InvalidArgument("key_id", "must not be empty")
        if len(request.key_id) > MAX_KEY_ID_LENGTH:
            raise InvalidArgument("key_id", f"must be at most {MAX_KEY_ID_LENGTH} characters")
        return pb.RevokeApiKeyResponse(key=_api_key(await self._access.revoke_key(request.key_id)))

    async def SetBudget(self, request, context):
        await self._admin(context)
        validate_tenant_id(request.tenant_id)
        forwarded = ledger_pb2.SetBudgetRequest(
            tenant_id=request.tenant_id,
            monthly_limit_micros=monthly_limit_micros(request.monthly_limit_usd),
            alert_percentages=request.alert_percentages,
            hard_stop=request.hard_stop,
        )
        try:
            await self._ledger.SetBudget(forwarded, timeout=LEDGER_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise _ledger_failure(exc) from None
        return pb.SetBudgetResponse(
            tenant_id=request.tenant_id,
            monthly_limit_usd=forwarded.monthly_limit_micros / MICROS_PER_USD,
        )

    async def GetUsage(self, request, context):
        await self._admin(context)
        validate_tenant_id(request.tenant_id)
        forwarded = ledger_pb2.GetUsageReportRequest(
            tenant_id=request.tenant_id, group_by=group_by(request.group_by)
        )
        for field in ("start_time", "end_time"):
            timestamp = parse_time(field, getattr(request, field))
            if timestamp is not None:
                getattr(forwarded, field).CopyFrom(timestamp)
        try:
            report = await self._ledger.GetUsageReport(forwarded, timeout=LEDGER_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise _ledger_failure(exc) from None
        return pb.GetUsageResponse(
            tenant_id=request.tenant_id,
            rows=[_usage_row(row) for row in report.rows],
            total=_usage_row(report.total),
        )

    async def GetRecommendations(self, request, context):
        await self._admin(context)
        validate_tenant_id(request.tenant_id)
        reply = await ledger_recommendations(self._ledger, request.tenant_id)
        return pb.GetRecommendationsResponse(tenant_id=request.tenant_id, **recommendation_fields(reply))

    async def InvalidateCache(self, request, context):
        await self._admin(context)
        validate_tenant_id(request.tenant_id)
        if len(request.model) > MAX_MODEL_ID_LENGTH:
            raise InvalidArgument("model", f"must be at most {MAX_MODEL_ID_LENGTH} characters")
        try:
            reply = await self._cache.Invalidate(
                cache_pb2.InvalidateRequest(tenant_id=request.tenant_id, model=request.model),
                timeout=DEPENDENCY_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            raise dependency_failure("the cache", exc) from None
        return pb.InvalidateCacheResponse(tenant_id=request.tenant_id, removed=reply.removed)
