"""Asks the Router for a plan; when the Router cannot answer, falls back to the configured chains.

While the Router is known to be down (its breaker is open) the plan is made here at once instead of
every request waiting for a Router that is not there.

Outcomes go to the Router in batches (`OutcomeReporter`): one ReportOutcome RPC carries every attempt
that ended in the last few milliseconds. Reports that cannot be delivered (Router down, queue full) are
counted (`sophia.gateway.router_reports.dropped`) and logged once per outage, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import metrics
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs.breaker import UNREACHABLE, DependencyBreaker, grpc_health_probe
from libs.clients import open_channel
from libs.config import Config
from libs.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError, field_violations, shown
from libs.feature_flags import FeatureFlags
from libs.routing_rules import AUTO, RouteQuery, RoutingRules
from services.gateway.domain import ChatRequest, Target

log = logging.getLogger(__name__)

# The Router's own verdicts on the request are final (INVALID_ARGUMENT too, see _router_verdict); anything
# else means "Router unavailable".
_ROUTER_VERDICTS = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}
_PREFERENCES = {
    "fast": pb.MODEL_PREFERENCE_FAST,
    "quality": pb.MODEL_PREFERENCE_QUALITY,
    "code": pb.MODEL_PREFERENCE_CODE,
    "balanced": pb.MODEL_PREFERENCE_BALANCED,
}
_DIFFICULTIES = {pb.DIFFICULTY_SIMPLE: "simple", pb.DIFFICULTY_COMPLEX: "complex"}
# Routing is on the request path: a slow Router must not eat the caller's time.
ROUTE_TIMEOUT_SECONDS = 0.5
ROUTER_SERVICE = "sophia.router.v1.RouterService"
# What the Router reads of a conversation for its cheap features (the prompt is embedded whole).
MAX_PROMPT_CHARS = 8000
MAX_CONTEXT_CHARS = 2000

_meter = metrics.get_meter("sophia.gateway")
_reports_sent = _meter.create_counter(
    "sophia.gateway.router_reports.sent", unit="{report}", description="Attempt outcomes the Router took"
)
_reports_dropped = _meter.create_counter(
    "sophia.gateway.router_reports.dropped",
    unit="{report}",
    description="Attempt outcomes that could not be delivered to the Router, by reason",
)


@dataclass(frozen=True)
class Plan:
    targets: tuple[Target, ...]
    reason: str
    # For x-sophia-task-type / x-sophia-difficulty (empty when the Router did not classify).
    task_type: str = ""
    difficulty: str = ""
    confidence: float = 0.0


def _router_verdict(exc: grpc.aio.AioRpcError) -> ServiceError | None:
    """The client's error when the Router refused the request, None when the Router could not answer.

    An INVALID_ARGUMENT is the client's request refused (e.g. its task_type): a 400 naming the field the
    Router named, not a local plan that would skip the tenant's flags and budget-aware routing."""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(exc)
        if violations:
            return InvalidArgument(*violations[0])
        return InvalidArgument("request", exc.details() or "refused by the router")
    verdict = _ROUTER_VERDICTS.get(exc.code())
    return verdict(exc.details()) if verdict is not None else None


def conversation(request: ChatRequest) -> tuple[str, str]:
    """(last user message, the system prompt and earlier turns) as the Router reads them."""
    last = max((i for i, m in enumerate(request.messages) if m.role == "user"), default=-1)
    if last < 0:
        return "", ""
    context = "\n".join(m.content for m in request.messages[:last] if m.content)
    return request.messages[last].content[:MAX_PROMPT_CHARS], context[-MAX_CONTEXT_CHARS:]


class Routing:
    def __init__(self, config: Config, flags: FeatureFlags) -> None:
        self._config = config
        self._channel = open_channel(
            config.services.router.address,
            service=ROUTER_SERVICE,
            idempotent_methods=("Route", "ListModels", "GetProviderHealth"),
            settings=config.clients,
        )
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._breaker = DependencyBreaker(
            "router (routing by the configured rules)", grpc_health_probe(self._channel, ROUTER_SERVICE)
        )
        self._rules = RoutingRules(config)
        self._flags = flags
        self.reporter = OutcomeReporter(self._stub, self._breaker)
        self.snapshots = RouteSnapshots(self._stub, flags)
        self._health: HealthSummary | None = None
        self._health_until = 0.0

    def check_model(self, model: str, kind: str) -> None:
        """Unknown or wrong-kind models are refused before anything is called."""
        if kind == "chat" and model == "auto":
            return
        configured = self._config.models.get(model)
        if configured is None or not configured.enabled:
            raise NotFound(f"model: {shown(model)} does not exist; GET /v1/models lists the available models")
        if configured.kind != kind:
            raise InvalidArgument("model", f"{shown(model)} is a {configured.kind} model, not a {kind} model")

    def local_plan(self, request: ChatRequest, tenant_id: str, estimated_tokens: int) -> Plan:
        """The plan of the configured chains, computed here because the Router could not answer; a model
        whose flag is off for the tenant is left out here as the Router leaves it out."""
        plan = self._rules.route(RouteQuery(model=request.model, estimated_tokens=estimated_tokens))
        targets = tuple(
            Target(t.model_id, t.provider, t.provider_model)
            for t in plan.targets
            if self._flags.model_enabled(t.model_id, tenant_id)
        )
        if not targets:
            raise FailedPrecondition(
                f"model {shown(request.model)}: no model of its chain is enabled for this tenant"
            )
        return Plan(targets, f"{plan.reason} (router unavailable)", request.task_type)

    async def plan(
        self,
        request: ChatRequest,
        tenant_id: str,
        request_id: str,
        estimated_tokens: int,
        *,
        embedding: Sequence[float] | None = None,
        budget_used_fraction: float | None = None,
        tenant_tier: str = "",
    ) -> Plan:
        """`embedding`: the cache lookup's vector of the normalised last user message, so the Router does
        not embed it again; `budget_used_fraction`: spent / limit from CheckBudget, when known."""
        if not self._breaker.allows():
            return self.local_plan(request, tenant_id, estimated_tokens)
        if request.model != AUTO:
            snapshot_plan = self.snapshots.plan(request, tenant_id, estimated_tokens)
            if snapshot_plan is not None:
                return snapshot_plan
        prompt, context = conversation(request)
        try:
            reply = await self._stub.Route(
                pb.RouteRequest(
                    request_id=request_id,
                    tenant_id=tenant_id,
                    model=request.model,
                    task_type=request.task_type,
                    model_preference=_PREFERENCES.get(
                        request.model_preference, pb.MODEL_PREFERENCE_UNSPECIFIED
                    ),
                    kind=pb.MODEL_KIND_CHAT,
                    estimated_tokens=estimated_tokens,
                    prompt=prompt,
                    context=context,
                    prompt_embedding=embedding or (),
                    uses_tools=bool(request.tools),
                    uses_response_format=request.response_format is not None,
                    budget_used_fraction=budget_used_fraction,
                    tenant_tier=tenant_tier,
                ),
                timeout=ROUTE_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            verdict = _router_verdict(exc)
            if verdict is not None:
                raise verdict from None
            if exc.code() in UNREACHABLE:
                self._breaker.record_failure(exc.code().name)  # logs once per outage
            else:
                log.warning("router failed (%s); routing by the configured rules", exc.code().name)
            return self.local_plan(request, tenant_id, estimated_tokens)
        self._breaker.record_success()
        targets = tuple(Target(t.model_id, t.provider, t.provider_model) for t in reply.targets)
        if not targets:
            return self.local_plan(request, tenant_id, estimated_tokens)
        return Plan(
            targets, reply.reason, reply.task_type, _DIFFICULTIES.get(reply.difficulty, ""), reply.confidence
        )

    def report(self, attempts, background=None) -> None:
        """Queues finished attempts (fallback.Attempt) for the Router; `background` is no longer used.

        For a stream, report the failed attempts here and the one that streamed with `report_stream_end`
        when the stream is over."""
        for attempt in attempts:
            self.reporter.add(attempt_report(attempt))

    def report_stream_end(
        self,
        target: Target,
        started: float,
        time_to_first_token_ms: int,
        error: str = "",
        *,
        retryable: bool = True,
    ) -> None:
        """A stream's real end: `started` is the attempt's time.perf_counter() start; `error` the
        ProviderError kind when it failed after its first token (empty on success)."""
        if not error:
            outcome = pb.OUTCOME_SUCCESS
        elif error == "timeout":
            outcome = pb.OUTCOME_TIMEOUT
        else:
            outcome = pb.OUTCOME_RETRYABLE_ERROR if retryable else pb.OUTCOME_FATAL_ERROR
        self.reporter.add(
            pb.OutcomeReport(
                provider=target.provider,
                model_id=target.model_id,
                outcome=outcome,
                latency_ms=int((time.perf_counter() - started) * 1000),
                time_to_first_token_ms=time_to_first_token_ms,
                error=error,
            )
        )

    async def health(self) -> HealthSummary:
        """The Router's view of what can serve, for GET /health; asked at most once a second, so that
        polling /health costs the Router nothing. While the Router cannot be asked the Gateway still serves
        (by its rules): degraded, providers unknown."""
        now = time.monotonic()
        if self._health is not None and now < self._health_until:
            return self._health
        summary = await self._ask_health()
        self._health, self._health_until = summary, now + HEALTH_CACHE_SECONDS
        return summary

    async def _ask_health(self) -> HealthSummary:
        unknown = HealthSummary(
            "degraded", {provider: "unknown" for provider in sorted(self._config.providers)}
        )
        if not self._breaker.allows():
            return unknown
        try:
            reply = await self._stub.GetProviderHealth(
                pb.GetProviderHealthRequest(), timeout=ROUTE_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError:
            return unknown
        providers = {
            entry.provider: _AVAILABILITY.get(entry.availability, "unknown") for entry in reply.availability
        }
        return HealthSummary(_HEALTH.get(reply.status, "degraded"), providers)

    def embedding_target(self, model: str) -> Target:
        return Target(model, self._config.models[model].provider, self._config.provider_model(model))

    async def close(self) -> None:
        await self.snapshots.aclose()
        await self.reporter.aclose()
        await self._breaker.aclose()
        await self._channel.close()


_OUTCOMES = {"success": pb.OUTCOME_SUCCESS, "timeout": pb.OUTCOME_TIMEOUT}
HEALTH_CACHE_SECONDS = 1.0
# The Router sends a snapshot at least every 5 s: one older than this means the stream is gone.
SNAPSHOT_STALE_SECONDS = 12.0
SNAPSHOT_RETRY_SECONDS = 1.0
_HEALTH = {
    pb.HEALTH_STATUS_HEALTHY: "healthy",
    pb.HEALTH_STATUS_DEGRADED: "degraded",
    pb.HEALTH_STATUS_UNHEALTHY: "unhealthy",
}
_AVAILABILITY = {
    pb.AVAILABILITY_AVAILABLE: "available",
    pb.AVAILABILITY_DEGRADED: "degraded",
    pb.AVAILABILITY_UNAVAILABLE: "unavailable",
}


@dataclass(frozen=True)
class HealthSummary:
    status: str  # healthy | degraded | unhealthy
    providers: dict[str, str]  # provider → available | degraded | unavailable | unknown


def attempt_report(attempt) -> pb.OutcomeReport:
    if attempt.outcome in _OUTCOMES:
        outcome = _OUTCOMES[attempt.outcome]
    else:
        outcome = pb.OUTCOME_RETRYABLE_ERROR if attempt.retryable else pb.OUTCOME_FATAL_ERROR
    return pb.OutcomeReport(
        provider=attempt.target.provider,
        model_id=attempt.target.model_id,
        outcome=outcome,
        latency_ms=attempt.latency_ms,
        time_to_first_token_ms=getattr(attempt, "time_to_first_token_ms", 0),
        error="" if attempt.outcome == "success" else attempt.outcome,
    )


class OutcomeReporter:
    """Batches outcome reports: flushed every `flush_seconds` or at `batch_size` entries, one RPC each.

    Bounded: beyond `max_pending` queued reports new ones are dropped and counted. A batch the Router
    does not take (down, refused) is counted as dropped and logged once per outage: health is a
    statistic, so a lost batch is not retried into a Router that is not there."""

    def __init__(
        self,
        stub: router_pb2_grpc.RouterServiceStub,
        breaker: DependencyBreaker,
        *,
        flush_seconds: float = 0.05,
        batch_size: int = 256,
        max_pending: int = 10_000,
        timeout_seconds: float = 1.0,
    ) -> None:
        self._stub = stub
        self._breaker = breaker
        self._flush_seconds = flush_seconds
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._timeout_seconds = timeout_seconds
        self._pending: list[pb.OutcomeReport] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False
        self.sent = 0
        self.dropped = 0

    def add(self, report: pb.OutcomeReport) -> None:
        if len(self._pending) >= self._max_pending:
            self._drop(1, "queue_full")
            return
        self._pending.append(report)
        if self._task is None:
            # A context of its own: made in the first request's, the task would inherit that request's
            # deadline and every flush after it would fail (DeadlineExceeded) and end the task.
            self._task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._flush_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            # One batch per interval: sending again as soon as a flush returned would, under steady
            # load, make every batch as small as what arrived during one RPC.
            await self.flush_once()
            if len(self._pending) >= self._batch_size:
                self._wake.set()

    async def flush_once(self) -> None:
        batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
        if not batch:
            return
        if not self._breaker.allows():
            self._drop(len(batch), "router_down")
            return
        try:
            await self._stub.ReportOutcome(
                pb.ReportOutcomeRequest(reports=batch), timeout=self._timeout_seconds
            )
        except grpc.aio.AioRpcError as exc:
            # Not held against the Router's breaker: an UNAVAILABLE here may be its health store.
            self._drop(len(batch), exc.code().name.lower())
            return
        if self._failing:
            log.info("router takes outcome reports again (%d dropped so far)", self.dropped)
            self._failing = False
        self.sent += len(batch)
        _reports_sent.add(len(batch))

    def _drop(self, count: int, reason: str) -> None:
        self.dropped += count
        _reports_dropped.add(count, {"reason": reason})
        if not self._failing:
            log.warning("outcome reports not delivered to the router (%s): %d dropped", reason, count)
            self._failing = True

    async def aclose(self) -> None:
        """Sends what is queued (bounded by the timeout), then stops."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._pending:
            await self.flush_once()


@dataclass(frozen=True)
class _Traits:
    target: Target
    context_window: int
    enabled: bool
    refuses_tools: bool
    refuses_response_format: bool
    closed: bool


class RouteSnapshots:
    """The Router's WatchRoutes stream, kept open in the background: an explicit-model request is planned
    from the latest snapshot, without a Route call, when the snapshot is fresh and every target the plan
    would use has a closed circuit. The filters are the Router's (enabled, context window, tools,
    response_format, the tenant's model flags from the same flag file); anything else (a circuit open or
    half-open, a model the snapshot does not know, nothing left after the filters) is the Router's to plan.
    """

    def __init__(self, stub: router_pb2_grpc.RouterServiceStub, flags: FeatureFlags) -> None:
        self._stub = stub
        self._flags = flags
        self._chains: dict[str, tuple[str, ...]] = {}
        self._traits: dict[str, _Traits] = {}
        self._fresh_until = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        while True:
            opened = time.monotonic()
            try:
                # The stream ends at the call's deadline (the client default); it is simply reopened.
                async for snapshot in self._stub.WatchRoutes(pb.WatchRoutesRequest()):
                    self._take(snapshot)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    log.debug("route snapshots interrupted: %s", exc.code().name)
            except Exception:
                # The watch must outlive anything: without it every explicit-model request asks the Router.
                log.exception("route snapshots: the stream failed; reopened")
            # Not in a tight loop when a stream ends at once (a Router draining, or failing every stream).
            if time.monotonic() - opened < SNAPSHOT_RETRY_SECONDS:
                await asyncio.sleep(SNAPSHOT_RETRY_SECONDS)

    def _take(self, snapshot: pb.WatchRoutesResponse) -> None:
        self._chains = {chain.model_id: tuple(chain.chain) for chain in snapshot.chains}
        self._traits = {
            t.target.model_id: _Traits(
                Target(t.target.model_id, t.target.provider, t.target.provider_model),
                t.context_window,
                t.enabled,
                t.refuses_tools,
                t.refuses_response_format,
                t.circuit_state == pb.CIRCUIT_STATE_CLOSED,
            )
            for t in snapshot.targets
        }
        self._fresh_until = time.monotonic() + SNAPSHOT_STALE_SECONDS

    def plan(self, request: ChatRequest, tenant_id: str, estimated_tokens: int) -> Plan | None:
        """The plan for an explicit model as the Router would make it, or None when only the Router may."""
        chain = self._chains.get(request.model)
        if chain is None or time.monotonic() > self._fresh_until:
            return None
        targets: list[Target] = []
        notes: list[str] = []
        for model_id in chain:
            traits = self._traits.get(model_id)
            if traits is None:
                return None
            problem = self._problem(traits, request, tenant_id, estimated_tokens)
            if problem:
                notes.append(f"skipped {model_id} ({problem})")
            elif not traits.closed:
                return None  # probes and open circuits are the Router's decisions
            else:
                targets.append(traits.target)
        if not targets:
            return None  # the Router says why nothing can serve
        reason = f"explicit model {request.model}"
        return Plan(tuple(targets), f"{reason}; {'; '.join(notes)}" if notes else reason)

    def _problem(self, traits: _Traits, request: ChatRequest, tenant_id: str, estimated_tokens: int) -> str:
        if not traits.enabled:
            return "disabled"
        if estimated_tokens and traits.context_window < estimated_tokens:
            return f"context window {traits.context_window} < {estimated_tokens} tokens"
        if request.tools and traits.refuses_tools:
            return "no tools"
        if request.response_format is not None and traits.refuses_response_format:
            return "no response_format"
        if not self._flags.model_enabled(traits.target.model_id, tenant_id):
            return "flag off for this tenant"
        return ""

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
