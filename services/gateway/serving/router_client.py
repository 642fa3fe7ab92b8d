"""Asks the Router for a plan; when the Router cannot answer, falls back to the configured chains.

While the Router is known to be down (its breaker is open) the plan is made here at once, and outcome
reports are dropped, instead of every request waiting for a Router that is not there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs.breaker import UNREACHABLE, DependencyBreaker, grpc_health_probe
from libs.clients import open_channel
from libs.config import Config
from libs.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from libs.routing_rules import RouteQuery, RoutingRules
from services.gateway.domain import ChatRequest, Target

log = logging.getLogger(__name__)

# The Router's own verdicts on the request are final; anything else means "Router unavailable".
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
# Routing is on the request path: a slow Router must not eat the caller's time.
ROUTE_TIMEOUT_SECONDS = 0.5
ROUTER_SERVICE = "sophia.router.v1.RouterService"


@dataclass(frozen=True)
class Plan:
    targets: tuple[Target, ...]
    reason: str


class Routing:
    def __init__(self, config: Config) -> None:
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

    def check_model(self, model: str, kind: str) -> None:
        """Unknown or wrong-kind models are refused before anything is called."""
        if kind == "chat" and model == "auto":
            return
        configured = self._config.models.get(model)
        if configured is None or not configured.enabled:
            raise NotFound(f"model: {shown(model)} does not exist; GET /v1/models lists the available models")
        if configured.kind != kind:
            raise InvalidArgument("model", f"{shown(model)} is a {configured.kind} model, not a {kind} model")

    def local_plan(self, request: ChatRequest, estimated_tokens: int) -> Plan:
        """The plan the Router's rules give, computed here because the Router could not answer."""
        plan = self._rules.route(
            RouteQuery(
                model=request.model,
                task_type=request.task_type,
                preference=request.model_preference or None,
                estimated_tokens=estimated_tokens,
            )
        )
        targets = tuple(Target(t.model_id, t.provider, t.provider_model) for t in plan.targets)
        return Plan(targets, f"{plan.reason} (router unavailable)")

    async def plan(
        self, request: ChatRequest, tenant_id: str, request_id: str, estimated_tokens: int
    ) -> Plan:
        if not self._breaker.allows():
            return self.local_plan(request, estimated_tokens)
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
                ),
                timeout=ROUTE_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            verdict = _ROUTER_VERDICTS.get(exc.code())
            if verdict is not None:
                raise verdict(exc.details()) from None
            if exc.code() in UNREACHABLE:
                self._breaker.record_failure(exc.code().name)  # logs once per outage
            else:
                log.warning("router failed (%s); routing by the configured rules", exc.code().name)
            return self.local_plan(request, estimated_tokens)
        self._breaker.record_success()
        targets = tuple(Target(t.model_id, t.provider, t.provider_model) for t in reply.targets)
        if not targets:
            return self.local_plan(request, estimated_tokens)
        return Plan(targets, reply.reason)

    def report(self, attempts, background) -> None:
        if not self._breaker.allows():
            return
        for attempt in attempts:
            background.spawn(report_outcome(self._stub, attempt))

    def embedding_target(self, model: str) -> Target:
        return Target(model, self._config.models[model].provider, self._config.provider_model(model))

    async def close(self) -> None:
        await self._breaker.aclose()
        await self._channel.close()


_OUTCOMES = {"success": pb.OUTCOME_SUCCESS, "timeout": pb.OUTCOME_TIMEOUT}
REPORT_TIMEOUT_SECONDS = 0.5


async def report_outcome(stub: router_pb2_grpc.RouterServiceStub, attempt) -> None:
    """Feeds one attempt to the Router's health stats; a Router that is down simply misses it."""
    if attempt.outcome in _OUTCOMES:
        outcome = _OUTCOMES[attempt.outcome]
    else:
        outcome = pb.OUTCOME_RETRYABLE_ERROR if attempt.retryable else pb.OUTCOME_FATAL_ERROR
    try:
        await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                provider=attempt.target.provider,
                model_id=attempt.target.model_id,
                outcome=outcome,
                latency_ms=attempt.latency_ms,
                error="" if attempt.outcome == "success" else attempt.outcome,
            ),
            timeout=REPORT_TIMEOUT_SECONDS,
        )
    except grpc.aio.AioRpcError as exc:
        log.debug("outcome not reported to the router: %s", exc.code().name)
