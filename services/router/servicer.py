"""RouterService over gRPC: validates requests and translates them for the routing rules and health book."""

from __future__ import annotations

import asyncio
import logging

from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs.config import Config, ConfigError, load_config
from libs.errors import FailedPrecondition, InvalidArgument
from libs.routing_rules import RouteQuery, RoutingRules
from services.router.health import HealthBook, Outcome

log = logging.getLogger(__name__)

# Names are echoed in errors and reasons and used as keys in memory: keep them short.
MAX_NAME_CHARS = 128

KINDS = {pb.MODEL_KIND_UNSPECIFIED: "chat", pb.MODEL_KIND_CHAT: "chat", pb.MODEL_KIND_EMBEDDING: "embedding"}
KINDS_TO_PROTO = {"chat": pb.MODEL_KIND_CHAT, "embedding": pb.MODEL_KIND_EMBEDDING}
PREFERENCES = {
    pb.MODEL_PREFERENCE_UNSPECIFIED: None,
    pb.MODEL_PREFERENCE_FAST: "fast",
    pb.MODEL_PREFERENCE_QUALITY: "quality",
    pb.MODEL_PREFERENCE_CODE: "code",
    pb.MODEL_PREFERENCE_BALANCED: "balanced",
}
OUTCOMES = {
    pb.OUTCOME_SUCCESS: Outcome.SUCCESS,
    pb.OUTCOME_RETRYABLE_ERROR: Outcome.RETRYABLE_ERROR,
    pb.OUTCOME_FATAL_ERROR: Outcome.FATAL_ERROR,
    pb.OUTCOME_TIMEOUT: Outcome.TIMEOUT,
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


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, config: Config) -> None:
        # Replaced whole on reload: a Route reads this once, so it never sees half-old, half-new rules.
        self._rules = RoutingRules(config)
        self._health = HealthBook()
        self._reloading = asyncio.Lock()

    async def Route(self, request, context):
        query = RouteQuery(
            model=_name("model", request.model),
            kind=_enum("kind", KINDS, request.kind),
            task_type=_name("task_type", request.task_type),
            preference=_enum("model_preference", PREFERENCES, request.model_preference),
            estimated_tokens=request.estimated_tokens,
        )
        plan = self._rules.route(query)
        return pb.RouteResponse(
            targets=[
                pb.RouteTarget(model_id=t.model_id, provider=t.provider, provider_model=t.provider_model)
                for t in plan.targets
            ],
            reason=plan.reason,
        )

    async def ReportOutcome(self, request, context):
        provider = _name("provider", request.provider, required=True)
        model_id = _name("model_id", request.model_id, required=True)
        if request.outcome == pb.OUTCOME_UNSPECIFIED:
            raise InvalidArgument("outcome", "must be set")
        outcome = _enum("outcome", OUTCOMES, request.outcome)
        if request.latency_ms < 0:
            raise InvalidArgument("latency_ms", "must not be negative")
        self._health.record(provider, model_id, outcome, request.latency_ms)
        return pb.ReportOutcomeResponse()

    async def GetProviderHealth(self, request, context):
        return pb.GetProviderHealthResponse(
            providers=[
                pb.ProviderHealth(
                    provider=r.provider,
                    model_id=r.model_id,
                    successes=r.successes,
                    failures=r.failures,
                    error_rate=r.error_rate,
                    p50_latency_ms=r.p50_latency_ms,
                )
                for r in self._health.reports()
            ]
        )

    async def ReloadConfig(self, request, context):
        # One reload at a time, so a slow older read can never replace a newer one.
        async with self._reloading:
            try:
                config = await asyncio.to_thread(load_config)
            except ConfigError as exc:
                log.warning("config reload refused; the current rules stay: %s", exc)
                raise FailedPrecondition(f"config not reloaded, the current rules stay: {exc}") from None
            self._rules = RoutingRules(config)
        # Only models, providers and routing take effect; ports and the rest need a restart.
        log.info("routing config reloaded: %d models", len(config.models))
        return pb.ReloadConfigResponse(models=len(config.models))

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
                for model_id, model in self._rules.config.models.items()
            ]
        )
