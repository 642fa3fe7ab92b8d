"""libs.telemetry.SummedHistogram: bucketed in-process, handed to the metric readers at collection exactly
as the SDK's own histogram would be."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from libs.telemetry import SummedHistogram, _OtlpReader, prometheus_reader

RESOURCE = Resource.create({"service.name": "sophia-test"})
BOUNDARIES = (0.01, 0.02, 0.04, 0.08)
# Values on, between, below and above the boundaries, and ones the SDK drops (negative, infinite, NaN).
VALUES = (0.0, 0.005, 0.01, 0.015, 0.02, 0.04, 0.041, 0.08, 0.5, 7.25, -1.0, math.inf, math.nan)


def _lines(text: str, family: str) -> list[str]:
    return sorted(line for line in text.splitlines() if family in line)


def _sample(text: str, name: str, label: str = "") -> float:
    """The value of the one sample of `name` (with `label`) in the scope t.alone for rpc.method /x."""
    (value,) = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{")
        and label in line
        and 'otel_scope_name="t.alone"' in line
        and 'rpc_method="/x"' in line
    ]
    return value


def _record(histogram, values: Sequence[float]) -> None:
    for i, value in enumerate(values):
        # The same attribute set in two orders is one series; a third set is another.
        attributes = {"a.kind": "x", "b.model": "m"} if i % 2 else {"b.model": "m", "a.kind": "x"}
        histogram.record(value, attributes)
        histogram.record(value * 2, {"a.kind": "y"})


def test_prometheus_serves_a_summed_histogram_exactly_as_the_sdks_own_histogram():
    registry = CollectorRegistry()
    provider = MeterProvider(
        resource=RESOURCE, metric_readers=[prometheus_reader(RESOURCE, registry=registry)]
    )
    sdk = provider.get_meter("t.prometheus").create_histogram(
        "t.sdk.duration", unit="s", description="How long", explicit_bucket_boundaries_advisory=BOUNDARIES
    )
    ours = SummedHistogram(
        "t.prometheus", "t.ours.duration", unit="s", description="How long", boundaries=BOUNDARIES
    )
    _record(sdk, VALUES)
    _record(ours, VALUES)

    text = generate_latest(registry).decode()
    sdk_lines = _lines(text, "t_sdk_duration_seconds")
    assert len(sdk_lines) > 12  # buckets, sum and count of two series, HELP and TYPE
    assert _lines(text, "t_ours_duration_seconds") == [
        line.replace("t_sdk_duration_seconds", "t_ours_duration_seconds") for line in sdk_lines
    ]
    assert 'le="+Inf",otel_scope_name="t.prometheus"' in "".join(sdk_lines).replace("} ", "}")


def test_a_summed_histogram_is_served_when_the_sdk_itself_has_nothing_to_report():
    registry = CollectorRegistry()
    MeterProvider(resource=RESOURCE, metric_readers=[prometheus_reader(RESOURCE, registry=registry)])
    ours = SummedHistogram("t.alone", "t.alone.latency", unit="ms", boundaries=(1, 10))
    ours.record(3, {"rpc.method": "/x"})
    ours.record(30, {"rpc.method": "/x"})

    text = generate_latest(registry).decode()
    assert _sample(text, "t_alone_latency_milliseconds_count") == 2
    assert _sample(text, "t_alone_latency_milliseconds_bucket", 'le="10.0"') == 1
    assert _sample(text, "t_alone_latency_milliseconds_sum") == 33
    # Collected twice: the same series, not a second copy of it.
    text = generate_latest(registry).decode()
    assert len(re.findall(r"^t_alone_latency_milliseconds_count", text, re.MULTILINE)) == 1


class _KeptExports(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        return None


def _exported_metric(data: MetricsData, name: str):
    found = [
        (scope.scope.name, metric)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
    ]
    assert len(found) == 1, found
    return found[0]


def test_otlp_exports_a_summed_histogram_as_a_cumulative_histogram_beside_the_sdks_metrics():
    exporter = _KeptExports()
    reader = _OtlpReader(exporter, resource=RESOURCE, export_interval_millis=math.inf)
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    provider.get_meter("t.sdk").create_counter("t.sdk.calls").add(2)
    ours = SummedHistogram("t.otlp", "t.otlp.tokens", unit="{token}", boundaries=(1, 4, 16))
    for value in (1, 3, 4, 5, 100):
        ours.record(value, {"gen_ai.token.type": "input"})

    reader.collect()
    ours.record(2, {"gen_ai.token.type": "input"})
    reader.collect()

    first, second = exporter.exported
    assert _exported_metric(first, "t.sdk.calls")[1].data.data_points[0].value == 2
    scope, metric = _exported_metric(first, "t.otlp.tokens")
    assert scope == "t.otlp" and metric.unit == "{token}"
    assert metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    (point,) = metric.data.data_points
    assert dict(point.attributes) == {"gen_ai.token.type": "input"}
    assert (point.count, point.sum, point.min, point.max) == (5, 113, 1, 100)
    assert list(point.bucket_counts) == [1, 2, 1, 1] and list(point.explicit_bounds) == [1, 4, 16]
    (point,) = _exported_metric(second, "t.otlp.tokens")[1].data.data_points
    assert (point.count, point.sum, list(point.bucket_counts)) == (6, 115, [1, 3, 1, 1])  # cumulative
    provider.shutdown()
