"""The mesh's overall health as the Router sees it, for GetProviderHealth and the edge's /health."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from enum import StrEnum

from services.router.health import CircuitState, TargetHealth
from services.router.router import RoutingState


class HealthStatus(StrEnum):
    HEALTHY = "healthy"  # every breaker closed
    DEGRADED = "degraded"  # a breaker open or half-open, or the shared health store unreachable
    UNHEALTHY = "unhealthy"  # no enabled chat model can serve


class Availability(StrEnum):
    AVAILABLE = "available"  # every model of the provider closed
    DEGRADED = "degraded"  # some open or half-open
    UNAVAILABLE = "unavailable"  # all open


def overall_status(
    state: RoutingState, targets: Sequence[TargetHealth], store_reachable: bool
) -> tuple[HealthStatus, dict[str, Availability]]:
    models = state.config.models
    configured = {
        (t.provider, t.model_id): t for t in targets if t.model_id in models and models[t.model_id].enabled
    }
    per_provider: dict[str, list[CircuitState]] = defaultdict(list)
    for (provider, _), target in configured.items():
        per_provider[provider].append(target.state)
    availability = {}
    for provider, states in per_provider.items():
        if all(s is CircuitState.CLOSED for s in states):
            availability[provider] = Availability.AVAILABLE
        elif all(s is CircuitState.OPEN for s in states):
            availability[provider] = Availability.UNAVAILABLE
        else:
            availability[provider] = Availability.DEGRADED
    can_serve = any(
        target.state is not CircuitState.OPEN and models[model_id].kind == "chat"
        for (_, model_id), target in configured.items()
    )
    if not can_serve:
        return HealthStatus.UNHEALTHY, availability
    if not store_reachable or any(a is not Availability.AVAILABLE for a in availability.values()):
        return HealthStatus.DEGRADED, availability
    return HealthStatus.HEALTHY, availability
