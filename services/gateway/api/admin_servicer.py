"""AdminService (REST under /admin/v1 through the edge): API keys (created, rotated, revoked, scoped),
admin keys and their roles, budgets, usage, recommendations, cache invalidation, config reload and the
audit log — for admin keys, each action checked against the key's role and tenants and audited
(`admin_actions.py`).

Keys are managed by `AccessControl`; budgets and usage belong to the CostLedger, which this forwards to,
converting US dollars to and from the ledger's integer micro-dollars.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sophia.cache.v1 import cache_pb2, cache_pb2_grpc
from sophia.gateway.v1 import admin_pb2 as pb
from sophia.gateway.v1 import admin_pb2_grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from sophia.router.v1 import router_pb2, router_pb2_grpc

from libs.config import TENANT_ID
from libs.errors import FailedPrecondition, InvalidArgument, ServiceError, Unavailable, field_violations
from libs.feature_flags import FeatureFlags, FlagError
from libs.pricing import MICROS_PER_USD, usd_to_micros
from services.gateway.access.api_keys import ApiKey
from services.gateway.access.audit import DEFAULT_PAGE_SIZE, AuditEntry, AuditLog, AuditOutcome, AuditQuery
from services.gateway.access.control import AccessControl
from services.gateway.access.key_store import NewKey
from services.gateway.access.roles import Endpoint, KeyScope, Permission, Role
from services.gateway.api.admin_actions import AdminActions
from services.gateway.api.insight_servicer import (
    DEPENDENCY_TIMEOUT_SECONDS,
    dependency_failure,
    group_by,
    ledger_recommendations,
    recommendation_fields,
)

log = logging.getLogger(__name__)

MAX_KEY_NAME_LENGTH = 128
MAX_KEY_ID_LENGTH = 128
MAX_MODEL_ID_LENGTH = 256
MAX_MONTHLY_LIMIT_USD = 1_000_000_000
# RFC 3339 date-time (the ISO 8601 profile with a mandatory offset); fromisoformat does the rest.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
LEDGER_TIMEOUT_SECONDS = 10.0
INT32_MAX = 2**31 - 1
# The last second a protobuf Timestamp may hold (9999-12-31T23:59:59Z).
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def validate_tenant_id(tenant_id: str, field: str = "tenant_id") -> None:
    if not tenant_id:
        raise InvalidArgument(field, "must not be empty")
    if not TENANT_ID.fullmatch(tenant_id):
        raise InvalidArgument(field, "must be 1 to 64 characters of A-Z a-z 0-9 _ . -")


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


def _ledger_failure(exc: grpc.aio.AioRpcError) -> ServiceError:
    """The ledger's own INVALID_ARGUMENT names our field too; anything else is the ledger being down."""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(exc)
        if violations:
            return InvalidArgument(*violations[0])
        return InvalidArgument("request", exc.details() or "rejected by the ledger")
    return Unavailable(f"the cost ledger is unavailable ({exc.code().name}); try again shortly")


_ROLES = {
    Role.ADMIN: pb.ADMIN_ROLE_ADMIN,
    Role.OPERATOR: pb.ADMIN_ROLE_OPERATOR,
    Role.VIEWER: pb.ADMIN_ROLE_VIEWER,
}
_ENDPOINTS = {Endpoint.CHAT: pb.KEY_ENDPOINT_CHAT, Endpoint.EMBEDDINGS: pb.KEY_ENDPOINT_EMBEDDINGS}
_AUDIT_OUTCOMES = {
    AuditOutcome.OK: pb.AUDIT_OUTCOME_OK,
    AuditOutcome.DENIED: pb.AUDIT_OUTCOME_DENIED,
    AuditOutcome.FAILED: pb.AUDIT_OUTCOME_FAILED,
}


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _api_key(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=key.key_id,
        tenant_id=key.tenant_id,
        name=key.name,
        requests_per_minute=key.requests_per_minute,
        tokens_per_minute=key.tokens_per_minute,
        created=key.created,
        revoked=key.revoked,
        role=_ROLES.get(key.role, pb.ADMIN_ROLE_UNSPECIFIED),
        tenants=key.tenants,
        models=key.scope.models,
        endpoints=[_ENDPOINTS[e] for e in key.scope.endpoints],
        expires_at=_timestamp(key.expires_at),
        rotated_at=_timestamp(key.rotated_at),
        last_used_at=_timestamp(key.last_used),
    )


def new_key(request: pb.CreateApiKeyRequest, now: float) -> NewKey:
    """The key a CreateApiKey request asks for, every field checked."""
    role = next((r for r, value in _ROLES.items() if value == request.role), None)
    if role is None and request.role != pb.ADMIN_ROLE_UNSPECIFIED:
        raise InvalidArgument("role", f"unknown value {request.role}")
    if role is None:
        validate_new_key(
            request.tenant_id, request.name, request.requests_per_minute, request.tokens_per_minute
        )
        if request.tenants:
            raise InvalidArgument("tenants", "is for admin keys (set role); a tenant key has one tenant_id")
    else:
        if request.tenant_id:
            raise InvalidArgument("tenant_id", "must be empty for an admin key; scope it with tenants")
        validate_new_key("admin", request.name, request.requests_per_minute, request.tokens_per_minute)
        if request.models or request.endpoints:
            raise InvalidArgument("models", "models and endpoints scope tenant keys, not admin keys")
        for index, tenant in enumerate(request.tenants):
            validate_tenant_id(tenant, f"tenants[{index}]")
    for index, pattern in enumerate(request.models):
        if not pattern or len(pattern) > MAX_MODEL_ID_LENGTH:
            raise InvalidArgument(f"models[{index}]", f"must be 1 to {MAX_MODEL_ID_LENGTH} characters")
    endpoints = []
    for index, value in enumerate(request.endpoints):
        endpoint = next((e for e, number in _ENDPOINTS.items() if number == value), None)
        if endpoint is None:
            raise InvalidArgument(
                f"endpoints[{index}]", "must be KEY_ENDPOINT_CHAT or KEY_ENDPOINT_EMBEDDINGS"
            )
        endpoints.append(endpoint)
    expires_at = 0
    if request.HasField("expires_at"):
        expires_at = request.expires_at.seconds
        if expires_at <= now:
            raise InvalidArgument("expires_at", "must be in the future")
        if expires_at > MAX_TIMESTAMP_SECONDS or not 0 <= request.expires_at.nanos < 10**9:
            raise InvalidArgument("expires_at", "must be a valid time no later than 9999-12-31T23:59:59Z")
    return NewKey(
        tenant_id=request.tenant_id,
        name=request.name,
        requests_per_minute=request.requests_per_minute,
        tokens_per_minute=request.tokens_per_minute,
        role=role,
        tenants=tuple(request.tenants),
        scope=KeyScope(tuple(request.models), tuple(endpoints)),
        expires_at=expires_at,
    )


def validate_key_id(key_id: str) -> None:
    if not key_id:
        raise InvalidArgument("key_id", "must not be empty")
    if len(key_id) > MAX_KEY_ID_LENGTH:
        raise InvalidArgument("key_id", f"must be at most {MAX_KEY_ID_LENGTH} characters")


def key_permission(key: ApiKey) -> Permission:
    """Changing an admin key is changing who holds which role: admins only."""
    return Permission.MANAGE_ADMIN_KEYS if key.role is not None else Permission.MANAGE_KEYS


def audit_query(request: pb.GetAuditLogRequest) -> AuditQuery:
    outcome = next((o for o, value in _AUDIT_OUTCOMES.items() if value == request.outcome), None)
    if outcome is None and request.outcome != pb.AUDIT_OUTCOME_UNSPECIFIED:
        raise InvalidArgument("outcome", f"unknown value {request.outcome}")
    for field in ("action", "actor", "tenant_id"):
        if len(getattr(request, field)) > MAX_KEY_ID_LENGTH:
            raise InvalidArgument(field, f"must be at most {MAX_KEY_ID_LENGTH} characters")
    since, until = parse_time("since", request.since), parse_time("until", request.until)
    return AuditQuery(
        action=request.action,
        actor=request.actor,
        tenant_id=request.tenant_id,
        outcome=outcome,
        since=since.seconds + since.nanos / 1e9 if since else 0.0,
        until=until.seconds + until.nanos / 1e9 if until else 0.0,
        page_size=request.page_size or DEFAULT_PAGE_SIZE,
        page_token=request.page_token,
    )


def _audit_entry(entry: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        id=entry.entry_id,
        time=_timestamp(entry.at),
        actor=entry.actor,
        role=entry.role,
        action=entry.action,
        tenant_id=entry.tenant_id,
        target=entry.target,
        outcome=_AUDIT_OUTCOMES[entry.outcome],
        request_id=entry.request_id,
        detail=entry.detail,
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
        audit: AuditLog,
        ledger: ledger_pb2_grpc.LedgerServiceStub,
        cache: cache_pb2_grpc.CacheServiceStub,
        router: router_pb2_grpc.RouterServiceStub,
        flags: FeatureFlags,
        default_grace_seconds: int,
    ) -> None:
        self._access = access
        self._audit = audit
        self._actions = AdminActions(access, audit)
        self._ledger = ledger
        self._cache = cache
        self._router = router
        self._flags = flags
        self._default_grace_seconds = default_grace_seconds

    async def CreateApiKey(self, request, context):
        async with self._actions.begin(context, "create_key", tenant_id=request.tenant_id) as action:
            admin = await action.admin()
            new = new_key(request, time.time())
            if new.role is not None:
                action.action = "create_admin_key"
                await action.require(Permission.MANAGE_ADMIN_KEYS)
            else:
                await action.require(Permission.MANAGE_KEYS, new.tenant_id)
            key, secret = await self._access.create_key(new)
            action.target = key.key_id
            log.info("admin key %s created key %s", admin.key_id, key.key_id)
            return pb.CreateApiKeyResponse(key=_api_key(key), secret=secret)

    async def ListApiKeys(self, request, context):
        async with self._actions.begin(context, "list_keys", audit_success=False) as action:
            admin = await action.admin()
            if request.tenant_id:
                validate_tenant_id(request.tenant_id)
                await action.require(Permission.READ_KEYS, request.tenant_id)
            else:
                await action.require(Permission.READ_KEYS)
            keys = await self._access.list_keys(request.tenant_id)
            if admin.tenants:  # a scoped operator sees the keys of its tenants only
                keys = [key for key in keys if key.tenant_id in admin.tenants]
            return pb.ListApiKeysResponse(keys=[_api_key(key) for key in keys])

    async def RevokeApiKey(self, request, context):
        async with self._actions.begin(context, "revoke_key", target=request.key_id) as action:
            await action.admin()
            validate_key_id(request.key_id)
            key = await self._access.get_key(request.key_id)
            await action.require(key_permission(key), key.tenant_id)
            return pb.RevokeApiKeyResponse(key=_api_key(await self._access.revoke_key(request.key_id)))

    async def RotateApiKey(self, request, context):
        async with self._actions.begin(context, "rotate_key", target=request.key_id) as action:
            await action.admin()
            validate_key_id(request.key_id)
            grace = (
                request.grace_seconds if request.HasField("grace_seconds") else self._default_grace_seconds
            )
            if grace < 0:
                raise InvalidArgument(
                    "grace_seconds", "must not be negative (0 stops the old secret at once)"
                )
            key = await self._access.get_key(request.key_id)
            await action.require(key_permission(key), key.tenant_id)
            rotated, secret = await self._access.rotate_key(request.key_id, grace)
            return pb.RotateApiKeyResponse(
                key=_api_key(rotated),
                secret=secret,
                old_secret_valid_until=_timestamp(rotated.rotated_at + grace if grace else 0),
            )

    async def SetBudget(self, request, context):
        async with self._actions.begin(context, "set_budget", tenant_id=request.tenant_id) as action:
            await action.admin()
            validate_tenant_id(request.tenant_id)
            await action.require(Permission.SET_BUDGET, request.tenant_id)
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
        async with self._actions.begin(context, "read_usage", audit_success=False) as action:
            await action.admin()
            validate_tenant_id(request.tenant_id)
            await action.require(Permission.READ_USAGE, request.tenant_id)
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
        async with self._actions.begin(context, "read_recommendations", audit_success=False) as action:
            await action.admin()
            validate_tenant_id(request.tenant_id)
            await action.require(Permission.READ_USAGE, request.tenant_id)
            reply = await ledger_recommendations(self._ledger, request.tenant_id)
            return pb.GetRecommendationsResponse(tenant_id=request.tenant_id, **recommendation_fields(reply))

    async def InvalidateCache(self, request, context):
        async with self._actions.begin(
            context, "invalidate_cache", tenant_id=request.tenant_id, target=request.model
        ) as action:
            await action.admin()
            validate_tenant_id(request.tenant_id)
            if len(request.model) > MAX_MODEL_ID_LENGTH:
                raise InvalidArgument("model", f"must be at most {MAX_MODEL_ID_LENGTH} characters")
            await action.require(Permission.INVALIDATE_CACHE, request.tenant_id)
            try:
                reply = await self._cache.Invalidate(
                    cache_pb2.InvalidateRequest(tenant_id=request.tenant_id, model=request.model),
                    timeout=DEPENDENCY_TIMEOUT_SECONDS,
                )
            except grpc.aio.AioRpcError as exc:
                raise dependency_failure("the cache", exc) from None
            return pb.InvalidateCacheResponse(tenant_id=request.tenant_id, removed=reply.removed)

    async def GetAuditLog(self, request, context):
        async with self._actions.begin(context, "read_audit", audit_success=False) as action:
            admin = await action.admin()
            query = audit_query(request)
            if request.tenant_id:
                await action.require(Permission.READ_AUDIT, request.tenant_id)
            elif admin.tenants:
                await action.require_all_tenants(Permission.READ_AUDIT)
            else:
                await action.require(Permission.READ_AUDIT)
            entries, token = await self._audit.read(query)
            return pb.GetAuditLogResponse(entries=[_audit_entry(e) for e in entries], next_page_token=token)

    async def ReloadConfig(self, request, context):
        async with self._actions.begin(context, "reload_config") as action:
            await action.admin()
            await action.require(Permission.RELOAD_CONFIG)
            try:
                flags = await asyncio.to_thread(self._flags.reload)
            except FlagError as exc:
                raise FailedPrecondition(f"flag file refused, the flags in force stay: {exc}") from None
            try:
                reply = await self._router.ReloadConfig(
                    router_pb2.ReloadConfigRequest(), timeout=DEPENDENCY_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise FailedPrecondition(exc.details() or "the new config was refused") from None
                raise dependency_failure("the router", exc) from None
            return pb.ReloadConfigResponse(
                summary=f"router: {reply.models} models, {reply.task_types} task types, "
                f"{reply.model_flags + reply.feature_flags} flags; gateway flags: {flags.describe()}"
            )
