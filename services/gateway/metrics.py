"""The Gateway's business metrics, exported with the rest through OpenTelemetry (OTLP / Prometheus)."""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("sophia.gateway")

tokens = _meter.create_counter("sophia.gateway.tokens", unit="{token}", description="Tokens served")
cost = _meter.create_counter("sophia.gateway.cost", unit="u$", description="Provider cost in micro-dollars")
cache_results = _meter.create_counter("sophia.gateway.cache", description="Cache lookups by result")
provider_errors = _meter.create_counter(
    "sophia.gateway.provider.errors", description="Failed provider attempts"
)
