"""libs.telemetry.SummedHistogram: bucketed in-process, handed to the metric readers at collection exactly
as the SDK's own histogram would be."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.environment_variables import OTEL_METRICS_EXEMPLAR_FILTER
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from libs.telemetry import SummedHistogram, _WithSummedHistograms, prometheus_reader

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
    # Integer boundaries print as integers (le="4"), as the SDK prints them.
    sdk_tokens = provider.get_meter("t.prometheus").create_histogram(
        "t.sdk.tokens", unit="{token}", explicit_bucket_boundaries_advisory=(1, 4, 16)
    )
    our_tokens = SummedHistogram("t.prometheus", "t.ours.tokens", unit="{token}", boundaries=(1, 4, 16))
    _record(sdk_tokens, (0, 1, 2, 4, 5, 16, 17, 300))
    _record(our_tokens, (0, 1, 2, 4, 5, 16, 17, 300))

    text = generate_latest(registry).decode()
    sdk_lines = _lines(text, "t_sdk_duration_seconds")
    assert len(sdk_lines) > 12  # buckets, sum and count of two series, HELP and TYPE
    assert _lines(text, "t_ours_duration_seconds") == [
        line.replace("t_sdk_duration_seconds", "t_ours_duration_seconds") for line in sdk_lines
    ]
    assert 'le="+Inf",otel_scope_name="t.prometheus"' in "".join(sdk_lines).replace("} ", "}")
    sdk_lines = _lines(text, "t_sdk_tokens")
    assert 'le="4"' in "".join(sdk_lines)
    assert _lines(text, "t_ours_tokens") == [
        line.replace("t_sdk_tokens", "t_ours_tokens") for line in sdk_lines
    ]


def test_a_summed_histogram_is_served_when_the_sdk_itself_has_nothing_to_report():
    registry = CollectorRegistry()
    MeterProvider(resource=RESOURCE, metric_readers=[prometheus_reader(RESOURCE, registry=registry)])
    ours = SummedHistogram("t.alone", "t.alone.latency", unit="ms", boundaries=(1, 10))
    ours.record(3, {"rpc.method": "/x"})
    ours.record(30, {"rpc.method": "/x"})

    text = generate_latest(registry).decode()
    assert _sample(text, "t_alone_latency_milliseconds_count") == 2
    assert _sample(text, "t_alone_latency_milliseconds_bucket", 'le="10"') == 1
    assert _sample(text, "t_alone_latency_milliseconds_sum") == 33
    # Collected twice: the same series, not a second copy of it.
    text = generate_latest(registry).decode()
    assert len(re.findall(r"^t_alone_latency_milliseconds_count", text, re.MULTILINE)) == 1


class _Kept(_WithSummedHistograms, InMemoryMetricReader):
    """An in-memory reader that gets the summed histograms, as the Prometheus reader does."""


def test_a_summed_histogram_joins_the_sdks_own_entry_for_its_scope():
    # Two entries for one scope would be one too many: OTLP's encoder keeps the last of them only.
    reader = _Kept(resource=RESOURCE)
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    provider.get_meter("t.shared").create_counter("t.shared.calls").add(2)
    ours = SummedHistogram("t.shared", "t.shared.tokens", unit="{token}", boundaries=(1, 4, 16))
    for value in (1, 3, 4, 5, 100):
        ours.record(value, {"gen_ai.token.type": "input"})

    data = reader.get_metrics_data()
    (scope,) = [entry for entry in data.resource_metrics[0].scope_metrics if entry.scope.name == "t.shared"]
    assert sorted(metric.name for metric in scope.metrics) == ["t.shared.calls", "t.shared.tokens"]
    (point,) = next(m for m in scope.metrics if m.name == "t.shared.tokens").data.data_points
    assert (point.count, point.sum, point.min, point.max) == (5, 113, 1, 100)
    assert list(point.bucket_counts) == [1, 2, 1, 1] and list(point.explicit_bounds) == [1, 4, 16]
    (encoded,) = [
        entry
        for entry in encode_metrics(data).resource_metrics[0].scope_metrics
        if entry.scope.name == "t.shared"
    ]
    assert sorted(metric.name for metric in encoded.metrics) == ["t.shared.calls", "t.shared.tokens"]
    ours.record(2, {"gen_ai.token.type": "input"})
    (point,) = _points(reader.get_metrics_data(), "t.shared.tokens")
    assert (point.count, point.sum, list(point.bucket_counts)) == (6, 115, [1, 3, 1, 1])  # cumulative


def _points(data, name: str):
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_through_the_sdk_a_histogram_is_the_sdks_own_and_nothing_is_summed():
    # As with tracing on: exemplars and the exporter's own temporality then apply.
    summing, sdk = _Kept(resource=RESOURCE), InMemoryMetricReader()
    MeterProvider(resource=RESOURCE, metric_readers=[summing])
    ours = SummedHistogram("t.traced", "t.traced.duration", unit="s", boundaries=BOUNDARIES)
    ours.record_through(MeterProvider(resource=RESOURCE, metric_readers=[sdk]).get_meter("t.traced"))
    ours.record(0.03, {"a": "b"})
    ours.record(0.5, {"a": "b"})

    (point,) = _points(sdk.get_metrics_data(), "t.traced.duration")
    assert (point.count, point.sum, list(point.bucket_counts)) == (2, 0.53, [0, 0, 1, 0, 1])
    assert ours.metric(0) is None
    assert _points(summing.get_metrics_data() or MetricsData([]), "t.traced.duration") == []


def test_one_histogram_per_scope_and_name():
    SummedHistogram("t.once", "t.once.size")
    with pytest.raises(ValueError, match="exists already"):
        SummedHistogram("t.once", "t.once.size")


_SETUP = """
import os, sys
from libs.config import Telemetry
from libs.telemetry import SummedHistogram, setup_telemetry
before = SummedHistogram("t.setup", "t.setup.before")
setup_telemetry("gateway", Telemetry(otlp_endpoint=sys.argv[1]))
after = SummedHistogram("t.setup", "t.setup.after")
print(before._sdk is not None, after._sdk is not None, flush=True)
os._exit(0)  # no exporter shutdown at exit: nothing listens at the endpoint
"""


@pytest.mark.parametrize(
    ("otlp_endpoint", "through_sdk"), [("", "False False"), ("http://127.0.0.1:9", "True True")]
)
def test_setup_sends_the_histograms_through_the_sdk_only_with_tracing_on(otlp_endpoint, through_sdk):
    # setup_telemetry sets the process's one MeterProvider: run in a process of its own.
    root = Path(__file__).resolve().parents[2]
    environ = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'libs' / 'gen'}")
    environ.pop(OTEL_METRICS_EXEMPLAR_FILTER, None)
    finished = subprocess.run(
        [sys.executable, "-c", _SETUP, otlp_endpoint], env=environ, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == through_sdk
