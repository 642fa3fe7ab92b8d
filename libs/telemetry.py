"""OpenTelemetry tracing and metrics, set up once per process.

Traces are exported over OTLP when `telemetry.otlp_endpoint` is set; metrics are exported over OTLP too
and served for Prometheus on `telemetry.prometheus_base_port + <service offset>` when that is non-zero.
Trace context crosses every gRPC hop in the metadata (W3C `traceparent`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.environment_variables import OTEL_METRICS_EXEMPLAR_FILTER
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

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
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        port = settings.prometheus_base_port + PROMETHEUS_PORT_OFFSETS[component]
        # Loopback by default; a container sets the standard OTEL_EXPORTER_PROMETHEUS_HOST (e.g. 0.0.0.0)
        # so that Prometheus in another container or pod can scrape it.
        host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "127.0.0.1"
        start_http_server(port, addr=host)
        readers.append(PrometheusMetricReader())
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
