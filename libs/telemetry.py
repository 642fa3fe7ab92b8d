"""OpenTelemetry tracing and metrics, set up once per process.

Traces are exported over OTLP when `telemetry.otlp_endpoint` is set; metrics are exported over OTLP too
and served for Prometheus on `telemetry.prometheus_base_port + <service offset>` when that is non-zero.
Trace context crosses every gRPC hop in the metadata (W3C `traceparent`).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.environment_variables import OTEL_METRICS_EXEMPLAR_FILTER
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from libs.config import Telemetry

log = logging.getLogger(__name__)

TRACEPARENT_HEADER = "traceparent"  # W3C trace context
_tracing = False  # spans are recorded and exported (setup_telemetry with an OTLP endpoint)

# Offsets from telemetry.prometheus_base_port, so that five processes on one host never collide.
PROMETHEUS_PORT_OFFSETS = {"gateway": 0, "router": 1, "cache": 2, "ledger": 3, "inference": 4}


def setup_telemetry(component: str, settings: Telemetry) -> None:
    global _tracing
    _tracing = bool(settings.otlp_endpoint)
    resource = Resource.create({"service.name": f"sophia-{component}", "service.namespace": "sophia"})
    # Without an exporter nothing would ever read a span: the servers make none (libs/server.py passes the
    # caller's trace context on instead), which saves every RPC of every service a span's cost.
    sampler = ALWAYS_ON if settings.otlp_endpoint else ALWAYS_OFF
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    readers: list[MetricReader] = []
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True))
        )
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=settings.otlp_endpoint)))
    if settings.prometheus_base_port:
        from prometheus_client import start_http_server

        port = settings.prometheus_base_port + PROMETHEUS_PORT_OFFSETS[component]
        # Loopback by default; a container sets the standard OTEL_EXPORTER_PROMETHEUS_HOST (e.g. 0.0.0.0)
        # so that Prometheus in another container or pod can scrape it.
        host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "127.0.0.1"
        start_http_server(port, addr=host)
        readers.append(prometheus_reader(resource))
        log.info("prometheus metrics on %s:%d/metrics", host, port)
    trace.set_tracer_provider(tracer_provider)
    # Exemplars link a measurement to the sampled span it was made in: without tracing there is none, and
    # the trace-based filter would still look for one on every measurement (about a fifth of its cost).
    exemplars = (
        None
        if settings.otlp_endpoint or os.environ.get(OTEL_METRICS_EXEMPLAR_FILTER)
        else AlwaysOffExemplarFilter()
    )
    metrics.set_meter_provider(
        MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=exemplars)
    )
    if exemplars is None:  # exemplars wanted: the histograms are the SDK's own (see SummedHistogram)
        _record_histograms_through_sdk()


def _record_histograms_through_sdk() -> None:
    """Every SummedHistogram, made so far or from now on, records through an SDK histogram."""
    global _histograms_through_sdk
    _histograms_through_sdk = True
    for histogram in list(_summed_histograms.values()):
        histogram.record_through(metrics.get_meter(histogram.scope))


def tracing_enabled() -> bool:
    return _tracing


@contextlib.contextmanager
def attached_context(context: otel_context.Context) -> Iterator[None]:
    """`context` is the current OpenTelemetry context within the block."""
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


class SummedCounter:
    """A counter added to on a request path: summed here and read by OpenTelemetry when metrics are
    collected (an observable counter, exported exactly as a counter is: `<name>_total` in Prometheus,
    a cumulative sum over OTLP). Adding is one dict update; an SDK counter's `add` is a measurement
    through the SDK's storage: about 7 us alone, more in a busy process (the Gateway's OpenTelemetry
    measurements were 9 % of its main thread under `make bench`).

    Added to from the event loop's thread only; the collecting thread reads a copy of the sums."""

    def __init__(self, meter: metrics.Meter, name: str, *, unit: str = "", description: str = "") -> None:
        self._sums: dict[tuple[tuple[str, str], ...], float] = {}
        meter.create_observable_counter(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        key = tuple(attributes.items()) if attributes else ()
        self._sums[key] = self._sums.get(key, 0) + amount

    def _observe(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        # dict.items() copied by list() in C, without giving up the GIL: safe while the loop adds.
        return [metrics.Observation(total, dict(key)) for key, total in list(self._sums.items())]


# OpenTelemetry's default boundaries for an explicit-bucket histogram (the specification's).
# fmt: off
DEFAULT_BOUNDARIES = (
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 7500.0, 10000.0,
)
# fmt: on
_summed_histograms: dict[tuple[str, str], SummedHistogram] = {}  # by scope and name
_histograms_through_sdk = False  # set by setup_telemetry where exemplars are recorded


class _Series:
    """One attribute set's buckets: counts (the last one above every boundary), sum, min, max."""

    __slots__ = ("counts", "max", "min", "since", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.since = time.time_ns()


class SummedHistogram:
    """A histogram recorded on a request path: its buckets are counted here and handed to the Prometheus
    reader `setup_telemetry` makes at each collection, as the SDK's explicit-bucket histogram would be
    (same name, unit, boundaries and series: `<name>_bucket`, `_sum`, `_count`). Recording is a sort, a
    bisect and a few additions under a lock: 0.9 us with three attributes; an SDK histogram's `record` is a
    measurement through the SDK's storage: 6.8 us (it cleans, copies and hashes the attributes each time),
    more in a busy process, and the Gateway makes four per request.

    With tracing on (an OTLP endpoint) or an exemplar filter set, it records through an SDK histogram
    instead (`record_through`): exemplars then link its buckets to traces, and the OTLP exporter's
    temporality and aggregation preferences apply to it as to every other instrument.

    Recorded from any thread; read by the collecting thread under the same lock."""

    def __init__(
        self,
        scope: str,
        name: str,
        *,
        unit: str = "",
        description: str = "",
        boundaries: Sequence[float] = DEFAULT_BOUNDARIES,
    ) -> None:
        if (scope, name) in _summed_histograms:
            raise ValueError(f"a histogram {name} of {scope} exists already: one per process")
        self.scope, self.name, self._unit, self._description = scope, name, unit, description
        self._boundaries = tuple(boundaries)  # as given: the SDK prints 4 (not 4.0) for an int boundary
        self._series: dict[tuple[tuple[str, str], ...], _Series] = {}
        self._lock = threading.Lock()
        self._sdk: metrics.Histogram | None = None
        _summed_histograms[scope, name] = self
        if _histograms_through_sdk:
            self.record_through(metrics.get_meter(scope))

    def record_through(self, meter: metrics.Meter) -> None:
        """From now on, the measurements go to an SDK histogram of `meter` (see the class docstring)."""
        self._sdk = meter.create_histogram(
            self.name,
            unit=self._unit,
            description=self._description,
            explicit_bucket_boundaries_advisory=self._boundaries,
        )

    def record(self, value: float, attributes: Mapping[str, str] | None = None) -> None:
        if self._sdk is not None:
            self._sdk.record(value, attributes)
            return
        if not 0 <= value < math.inf:  # as the SDK: negative, infinite and NaN values are dropped
            return
        # Sorted: the same attribute set in another order is the same series.
        key = tuple(sorted(attributes.items())) if attributes else ()
        bucket = bisect.bisect_left(self._boundaries, value)  # buckets include their upper boundary
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self._boundaries) + 1)
            series.counts[bucket] += 1
            series.sum += value
            if value < series.min:
                series.min = value
            if value > series.max:
                series.max = value

    def metric(self, now_ns: int) -> Metric | None:
        """What was recorded so far (cumulative), None when nothing was."""
        with self._lock:  # copied under the lock, the points made outside it: record() waits less
            copied = [
                (key, list(series.counts), series.sum, series.min, series.max, series.since)
                for key, series in self._series.items()
            ]
        if not copied:
            return None
        points = [
            HistogramDataPoint(
                attributes=dict(key),
                start_time_unix_nano=since,
                time_unix_nano=now_ns,
                count=sum(counts),
                sum=total,
                bucket_counts=counts,
                explicit_bounds=self._boundaries,
                min=smallest,
                max=largest,
            )
            for key, counts, total, smallest, largest, since in copied
        ]
        histogram = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        return Metric(name=self.name, description=self._description, unit=self._unit, data=histogram)


def _with_summed_histograms(data: MetricsData | None, resource: Resource) -> MetricsData | None:
    """The SDK's collection (None when its own instruments had nothing) with the summed histograms'
    metrics added, each in the scope of its name (the SDK's own entry for that scope, where there is one)."""
    now = time.time_ns()
    added: dict[str, list[Metric]] = {}
    for histogram in list(_summed_histograms.values()):
        metric = histogram.metric(now)
        if metric is not None:
            added.setdefault(histogram.scope, []).append(metric)
    if not added:
        return data
    if data is None or not data.resource_metrics:
        data = MetricsData(resource_metrics=[ResourceMetrics(resource, [], resource.schema_url)])
    first, *rest = data.resource_metrics
    scopes = []
    for entry in first.scope_metrics:
        ours = added.pop(entry.scope.name, [])
        scopes.append(ScopeMetrics(entry.scope, [*entry.metrics, *ours], entry.schema_url) if ours else entry)
    for name, metrics_of_scope in added.items():
        scopes.append(ScopeMetrics(InstrumentationScope(name), metrics_of_scope, ""))
    return MetricsData(resource_metrics=[ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


class _WithSummedHistograms:
    """Mixed into a metric reader: every collection carries the summed histograms too, even one where the
    SDK's own instruments had nothing (the SDK then hands the reader nothing at all)."""

    def __init__(self, *args, resource: Resource, **kwargs) -> None:
        self._resource = resource
        self._handed = threading.local()  # whether this thread's collection reached _receive_metrics
        super().__init__(*args, **kwargs)

    def collect(self, timeout_millis: float = 10_000) -> None:
        self._handed.done = False
        super().collect(timeout_millis=timeout_millis)  # type: ignore[misc]
        if not self._handed.done and getattr(self, "_collect", None) is not None:
            summed = _with_summed_histograms(None, self._resource)
            if summed is not None:
                super()._receive_metrics(summed, timeout_millis=timeout_millis)  # type: ignore[misc]

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> None:
        self._handed.done = True
        data = _with_summed_histograms(metrics_data, self._resource)
        super()._receive_metrics(data, timeout_millis=timeout_millis, **kwargs)  # type: ignore[misc]


def prometheus_reader(resource: Resource, **kwargs) -> MetricReader:
    """OpenTelemetry's Prometheus reader (into prometheus_client's registry, or `registry=`), serving the
    summed histograms with the rest. Imported only when asked for."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    class PrometheusReader(_WithSummedHistograms, PrometheusMetricReader):
        pass

    return PrometheusReader(resource=resource, **kwargs)


def shutdown_telemetry() -> None:
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        shutdown = getattr(provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None):
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)


def inject_context(carrier: dict[str, str]) -> Mapping[str, str]:
    propagate.inject(carrier)
    return carrier
