"""What explicit-model plans depend on, for the Gateway to plan such requests without a Route call.

Each chat model's chain (the model, then its fallbacks) from the static rules, and each chat target's
traits the request-dependent filters read (context window, enabled, tools / response_format refused) with
its circuit state as this replica sees it. The Gateway applies the filters itself (the same ones as
`Router._fits`, plus the tenant's model flags from the same flag file) and uses the result only while every
target it would use is closed: half-open probes and open circuits stay the Router's decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.routing_rules import RouteTarget
from services.router.health import CircuitState, HealthBook
from services.router.router import RoutingState


@dataclass(frozen=True)
class TargetTraits:
    target: RouteTarget
    context_window: int
    enabled: bool
    refuses_tools: bool
    refuses_response_format: bool
    circuit_state: CircuitState


@dataclass(frozen=True)
class RouteSnapshot:
    chains: dict[str, tuple[str, ...]]  # model id → the model, then its fallbacks
    targets: tuple[TargetTraits, ...]


def route_snapshot(state: RoutingState, health: HealthBook | None) -> RouteSnapshot:
    chat_models = state.chat_models()
    chains = {model_id: tuple(state.rules.explicit_chain(model_id)[0]) for model_id in chat_models}
    traits = []
    for model_id in chat_models:
        target = state.rules.target(model_id)
        model, profile = state.config.models[model_id], state.profile(model_id)
        view = health.view((target.provider, target.model_id)) if health else None
        traits.append(
            TargetTraits(
                target=target,
                context_window=model.context_window,
                enabled=model.enabled,
                refuses_tools=profile.tools is False,
                refuses_response_format=profile.response_format is False,
                circuit_state=view.state if view else CircuitState.CLOSED,
            )
        )
    return RouteSnapshot(chains, tuple(traits))
