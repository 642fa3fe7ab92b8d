"""The Router's OpenTelemetry instruments (exported on its Prometheus endpoint as sophia_router_*)."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.router.health import CircuitState, HealthBook

_meter = metrics.get_meter("sophia.router")

decisions = _meter.create_counter(
    "sophia.router.decisions", unit="{decision}", description="Plans made, by the stage that decided"
)
classification_duration = _meter.create_histogram(
    "sophia.router.classification.duration",
    unit="ms",
    description="Classifying a prompt (features and both models; the embedding excluded)",
)
# 0 closed, 1 half-open, 2 open: a value an alert can threshold.
CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


def record_decision(plan) -> None:
    difficulty = plan.difficulty.value if plan.difficulty else "none"
    decisions.add(
        1, {"decision": plan.decision.value, "task_type": plan.task_type or "none", "difficulty": difficulty}
    )
    if plan.classify_seconds:
        classification_duration.record(plan.classify_seconds * 1000)


def observe_circuits(book: Callable[[], HealthBook]) -> None:
    """`sophia.router.circuit_state` per provider and model, read from this replica's breaker view."""

    def observe(_options: CallbackOptions):
        return [
            Observation(CIRCUIT_VALUES[view.state], {"provider": provider, "model": model})
            for (provider, model), view in book().views().items()
        ]

    _meter.create_observable_gauge(
        "sophia.router.circuit_state",
        callbacks=[observe],
        description="Circuit breaker per target: 0 closed, 1 half-open, 2 open",
    )
