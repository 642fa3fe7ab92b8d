"""RouterService over gRPC: validates requests and translates them for the Router, the health book and
the reloader."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from google.protobuf.timestamp_pb2 import Timestamp
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs.config import Config
from libs.errors import InvalidArgument, shown
from services.router import metrics
from services.router.classifier import Difficulty
from services.router.health import CircuitState, HealthBook, Outcome, OutcomeReport
from services.router.reloader import Reloader
from services.router.router import Preference, Request, Router
from services.router.snapshot import RouteSnapshot, route_snapshot
from services.router.status import Availability, HealthStatus, overall_status

# Names are echoed in errors and reasons and used as keys in Redis: keep them short.
MAX_NAME_CHARS = 128
# Far below the 1 KiB the mesh allows a metadata value.
MAX_REASON_CHARS = 512
# Reports per ReportOutcome call: the Gateway flushes far fewer at a time.
MAX_REPORTS = 1000
# WatchRoutes: how often the snapshot is rebuilt and compared (a breaker that opens reaches the Gateways
# within this), and how often it is sent anyway (the Gateways treat a silent stream as stale).
SNAPSHOT_CHECK_SECONDS = 0.1
SNAPSHOT_HEARTBEAT_SECONDS = 5.0

KINDS = {pb.MODEL_KIND_UNSPECIFIED: "chat", pb.MODEL_KIND_CHAT: "chat", pb.MODEL_KIND_EMBEDDING: "embedding"}
KINDS_TO_PROTO = {"chat": pb.MODEL_KIND_CHAT, "embedding": pb.MODEL_KIND_EMBEDDING}
PREFERENCES = {
    pb.MODEL_PREFERENCE_UNSPECIFIED: None,
    pb.MODEL_PREFERENCE_FAST: Preference.FAST,
    pb.MODEL_PREFERENCE_QUALITY: Preference.QUALITY,
    pb.MODEL_PREFERENCE_CODE: Preference.CODE,
    pb.MODEL_PREFERENCE_BALANCED: Preference.BALANCED,
}
OUTCOMES = {
    pb.OUTCOME_SUCCESS: Outcome.SUCCESS,
    pb.OUTCOME_RETRYABLE_ERROR: Outcome.FAILURE,
    pb.OUTCOME_TIMEOUT: Outcome.FAILURE,
    pb.OUTCOME_FATAL_ERROR: Outcome.REJECTED,
}
# Error classes (the Gateway's ProviderError kinds) that are a verdict on the request, not on the target,
# whatever outcome they come with: "context_window" is a prompt too long for this model, which the Gateway
# reports as a retryable error so that its chain goes on to a model with a larger window.
REQUEST_ERRORS = frozenset({"context_window"})
DIFFICULTIES = {
    None: pb.DIFFICULTY_UNSPECIFIED,
    Difficulty.SIMPLE: pb.DIFFICULTY_SIMPLE,
    Difficulty.COMPLEX: pb.DIFFICULTY_COMPLEX,
}
HEALTH_STATUSES = {
    HealthStatus.HEALTHY: pb.HEALTH_STATUS_HEALTHY,
    HealthStatus.DEGRADED: pb.HEALTH_STATUS_DEGRADED,
    HealthStatus.UNHEALTHY: pb.HEALTH_STATUS_UNHEALTHY,
}
AVAILABILITIES = {
    Availability.AVAILABLE: pb.AVAILABILITY_AVAILABLE,
    Availability.DEGRADED: pb.AVAILABILITY_DEGRADED,
    Availability.UNAVAILABLE: pb.AVAILABILITY_UNAVAILABLE,
}
CIRCUIT_STATES = {
    CircuitState.CLOSED: pb.CIRCUIT_STATE_CLOSED,
    CircuitState.OPEN: pb.CIRCUIT_STATE_OPEN,
    CircuitState.HALF_OPEN: pb.CIRCUIT_STATE_HALF_OPEN,
}


def _name(field: str, value: str, *, required: bool = False) -> str:
    if required and not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(field, f"at most {MAX_NAME_CHARS} characters")
    return value


def _enum(field: str, table: dict, value: int):
    if value not in table:
        raise InvalidArgument(field, f"unknown value {value}")
    return table[value]


def _timestamp(ms: int) -> Timestamp | None:
    if not ms:
        return None
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def route_request(request) -> Request:
    budget = request.budget_used_fraction if request.HasField("budget_used_fraction") else None
    if budget is not None and not 0 <= budget <= 1000:  # NaN fails this too
        raise InvalidArgument("budget_used_fraction", f"must be between 0 and 1000, got {budget}")
    if request.estimated_tokens < 0:
        raise InvalidArgument("estimated_tokens", "must not be negative")
    if not all(map(math.isfinite, request.prompt_embedding)):
        raise InvalidArgument("prompt_embedding", "must hold finite numbers only")
    return Request(
        model=_name("model", request.model),
        kind=_enum("kind", KINDS, request.kind),
        task_type=_name("task_type", request.task_type),
        preference=_enum("model_preference", PREFERENCES, request.model_preference),
        estimated_tokens=request.estimated_tokens,
        tenant_id=_name("tenant_id", request.tenant_id),
        tenant_tier=_name("tenant_tier", request.tenant_tier),
        prompt=request.prompt,
        context=request.context,
        embedding=list(request.prompt_embedding) or None,
        uses_tools=request.uses_tools,
        uses_response_format=request.uses_response_format,
        budget_used_fraction=budget,
    )


def outcome_reports(request) -> list[OutcomeReport]:
    """The reports, each checked for shape; any malformed one refuses the whole call."""
    if not request.reports:
        raise InvalidArgument("reports", "must not be empty")
    if len(request.reports) > MAX_REPORTS:
        raise InvalidArgument("reports", f"at most {MAX_REPORTS} per call, got {len(request.reports)}")
    reports = []
    for index, entry in enumerate(request.reports):
        where = f"reports[{index}]"
        if entry.outcome == pb.OUTCOME_UNSPECIFIED:
            raise InvalidArgument(f"{where}.outcome", "must be set")
        if entry.latency_ms < 0:
            raise InvalidArgument(f"{where}.latency_ms", "must not be negative")
        if entry.time_to_first_token_ms < 0:
            raise InvalidArgument(f"{where}.time_to_first_token_ms", "must not be negative")
        outcome = _enum(f"{where}.outcome", OUTCOMES, entry.outcome)
        if entry.error in REQUEST_ERRORS:
            outcome = Outcome.REJECTED
        reports.append(
            OutcomeReport(
                provider=_name(f"{where}.provider", entry.provider, required=True),
                model_id=_name(f"{where}.model_id", entry.model_id, required=True),
                outcome=outcome,
                latency_ms=entry.latency_ms,
                time_to_first_token_ms=entry.time_to_first_token_ms,
                error=entry.error[:MAX_NAME_CHARS],
            )
        )
    return reports


def unknown_target(config: Config, index: int, report: OutcomeReport) -> InvalidArgument | None:
    """Why `report` (the request's reports[index]) names no target of `config`, or None if it names one.

    Only configured targets are tracked: invented names would otherwise fill the set of tracked targets
    until a real one could no longer be, and its breaker could never open."""
    model = config.models.get(report.model_id)
    if model is None:
        return InvalidArgument(
            f"reports[{index}].model_id", f"{shown(report.model_id)} is not a configured model"
        )
    if model.provider != report.provider:
        return InvalidArgument(
            f"reports[{index}].provider",
            f"{report.model_id} is served by {shown(model.provider)}, not {shown(report.provider)}",
        )
    return None


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router, health: HealthBook, reloader: Reloader) -> None:
        self._router = router
        self._health = health
        self._reloader = reloader
        # Set when the server drains: open WatchRoutes streams end at once instead of holding the drain.
        self._draining = asyncio.Event()

    def drain(self) -> None:
        self._draining.set()

    async def WatchRoutes(self, request, context):
        sent, sent_at = b"", 0.0
        while not self._draining.is_set():
            snapshot = snapshot_proto(route_snapshot(self._router.state, self._health))
            encoded = snapshot.SerializeToString(deterministic=True)
            if encoded != sent or time.monotonic() - sent_at >= SNAPSHOT_HEARTBEAT_SECONDS:
                yield snapshot
                sent, sent_at = encoded, time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._draining.wait(), SNAPSHOT_CHECK_SECONDS)

    async def Route(self, request, context):
        plan = await self._router.route(route_request(request))
        metrics.record_decision(plan)
        return pb.RouteResponse(
            targets=[
                pb.RouteTarget(model_id=t.model_id, provider=t.provider, provider_model=t.provider_model)
                for t in plan.targets
            ],
            # The Gateway passes it on as a header: ASCII (client-supplied names escaped) and bounded.
            reason=plan.reason.encode("ascii", "backslashreplace").decode()[:MAX_REASON_CHARS],
            task_type=plan.task_type,
            difficulty=DIFFICULTIES[plan.difficulty],
            confidence=plan.confidence,
        )

    async def ReportOutcome(self, request, context):
        reports = outcome_reports(request)
        config = self._router.state.config
        known, refusals = [], []
        for index, report in enumerate(reports):
            refusal = unknown_target(config, index, report)
            if refusal is None:
                known.append(report)
            else:
                refusals.append(refusal)
        # A Gateway whose config differs from this one (a reload on its way) still has its reports on the
        # targets both know recorded: they are health, and a batch is not sent again.
        recorded = await self._health.record(known)
        if refusals:
            first = refusals[0]
            raise InvalidArgument(
                first.field,
                f"{first.problem} ({len(refusals)} of {len(reports)} reports name no configured target "
                f"and were not recorded; the other {recorded} were)",
            )
        return pb.ReportOutcomeResponse(recorded=recorded)

    async def GetProviderHealth(self, request, context):
        state = self._router.state
        configured = [
            (model.provider, model_id) for model_id, model in state.config.models.items() if model.enabled
        ]
        targets = await self._health.report(configured)
        status, availability = overall_status(state, targets, self._health.store_reachable)
        return pb.GetProviderHealthResponse(
            status=HEALTH_STATUSES[status],
            availability=[
                pb.ProviderAvailability(provider=p, availability=AVAILABILITIES[a])
                for p, a in sorted(availability.items())
            ],
            providers=[
                pb.ProviderHealth(
                    provider=t.provider,
                    model_id=t.model_id,
                    successes=t.successes,
                    failures=t.failures,
                    error_rate=t.error_rate,
                    p50_latency_ms=t.p50_latency_ms,
                    p95_latency_ms=t.p95_latency_ms,
                    p50_time_to_first_token_ms=t.p50_time_to_first_token_ms,
                    last_error=t.last_error,
                    last_error_time=_timestamp(t.last_error_at_ms),
                    circuit_state=CIRCUIT_STATES[t.state],
                    circuit_state_since=_timestamp(t.state_since_ms),
                    consecutive_failures=t.consecutive_failures,
                )
                for t in targets
            ],
        )

    async def ReloadConfig(self, request, context):
        state = await self._reloader.reload()
        return pb.ReloadConfigResponse(
            models=len(state.config.models),
            task_types=len(state.classifier.task_types) if state.classifier else 0,
            model_flags=len(state.flags.flags.models),
            feature_flags=len(state.flags.flags.features),
        )

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[
                pb.ModelEntry(
                    model_id=model_id,
                    provider=model.provider,
                    kind=KINDS_TO_PROTO[model.kind],
                    context_window=model.context_window,
                    enabled=model.enabled,
                )
                for model_id, model in self._router.state.config.models.items()
            ]
        )


def snapshot_proto(snapshot: RouteSnapshot) -> pb.WatchRoutesResponse:
    return pb.WatchRoutesResponse(
        chains=[pb.ExplicitChain(model_id=m, chain=chain) for m, chain in snapshot.chains.items()],
        targets=[
            pb.TargetTraits(
                target=pb.RouteTarget(
                    model_id=t.target.model_id,
                    provider=t.target.provider,
                    provider_model=t.target.provider_model,
                ),
                context_window=t.context_window,
                enabled=t.enabled,
                refuses_tools=t.refuses_tools,
                refuses_response_format=t.refuses_response_format,
                circuit_state=CIRCUIT_STATES[t.circuit_state],
            )
            for t in snapshot.targets
        ],
    )
