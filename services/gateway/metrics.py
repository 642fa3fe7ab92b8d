"""The Gateway's business metrics, exported with the rest through OpenTelemetry (OTLP / Prometheus).

Where the OpenTelemetry GenAI semantic conventions define a metric, it is theirs (name, unit, attribute
names, bucket boundaries): `gen_ai.client.operation.duration` per provider call, `gen_ai.client.token.usage`
per answer. The rest are Sophia's own (`sophia.gateway.*`).
"""

from __future__ import annotations

from opentelemetry import metrics

from libs.telemetry import SummedCounter, SummedHistogram

_meter = metrics.get_meter("sophia.gateway")

# Bucket boundaries the GenAI conventions recommend.
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216]

# Added to for every answer: summed in-process, read at collection (libs.telemetry.SummedCounter).
tokens = SummedCounter(_meter, "sophia.gateway.tokens", unit="{token}", description="Tokens served")
cost = SummedCounter(_meter, "sophia.gateway.cost", unit="u$", description="Provider cost in micro-dollars")
cache_results = SummedCounter(_meter, "sophia.gateway.cache", description="Cache lookups by result")
provider_errors = _meter.create_counter(
    "sophia.gateway.provider.errors", description="Failed provider attempts"
)
# Recorded for every answer: bucketed in-process, read at collection (libs.telemetry.SummedHistogram).
operation_duration = SummedHistogram(
    "sophia.gateway",
    "gen_ai.client.operation.duration",
    unit="s",
    description="Duration of each call to a model provider (an attempt), streams until their last chunk",
    boundaries=_DURATION_BUCKETS,
)
token_usage = SummedHistogram(
    "sophia.gateway",
    "gen_ai.client.token.usage",
    unit="{token}",
    description="Input and output tokens per answer",
    boundaries=_TOKEN_BUCKETS,
)
time_to_first_token = SummedHistogram(
    "sophia.gateway",
    "sophia.gateway.time_to_first_token",
    unit="s",
    description="Time from the provider call to the first chunk of a streamed answer",
    boundaries=_DURATION_BUCKETS,
)


def provider_call(
    provider: str, model: str, seconds: float, error: str = "", operation: str = "chat"
) -> None:
    """One attempt at a provider, as the GenAI conventions name it; `error` the failure's kind."""
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    if error:
        attributes["error.type"] = error
    operation_duration.record(seconds, attributes)


def answer_tokens(provider: str, model: str, input_tokens: int, output_tokens: int, operation: str) -> None:
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    token_usage.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
    if operation == "chat":
        token_usage.record(output_tokens, {**attributes, "gen_ai.token.type": "output"})
