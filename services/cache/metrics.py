"""The cache's OpenTelemetry instruments (exported on its Prometheus endpoint, see libs/telemetry.py)."""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("sophia.cache")

lookups = _meter.create_counter(
    "sophia.cache.lookups", description="Lookups by result (hit/miss) and the layer that answered a hit"
)
vetoes = _meter.create_counter(
    "sophia.cache.vetoes", description="Semantic candidates refused, by reason (negation, number, ...)"
)
semantic_similarity = _meter.create_histogram(
    "sophia.cache.semantic_hit_similarity", description="Cosine similarity of semantic hits"
)
embedding_batch_size = _meter.create_histogram(
    "sophia.cache.embedding_batch_size", description="Texts embedded per model call (micro-batching)"
)
evictions = _meter.create_counter(
    "sophia.cache.evictions", description="Entries evicted at the per-tenant entry limit"
)
index_evictions = _meter.create_counter(
    "sophia.cache.index_evictions",
    description="Entries dropped from this replica's semantic index at its bound across tenants (they stay "
    "in Redis for exact lookups)",
)


def observe_index(entries_by_tenant) -> None:
    """Registers the gauge of indexed entries per tenant tag (`entries_by_tenant()` → {tag: count})."""

    def observe(_options):
        return [metrics.Observation(count, {"tenant": tag}) for tag, count in entries_by_tenant().items()]

    _meter.create_observable_gauge(
        "sophia.cache.indexed_entries", callbacks=[observe], description="Semantic index entries per tenant"
    )
