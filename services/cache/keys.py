"""Redis key derivation for the cache, pure functions so they can be tested without Redis.

Tenant ids and model names come from callers and may hold ':' or glob characters ('*', '?', '[').
They never appear raw in a key: each is replaced by a hex tag (a hash), so a tenant named "a:b" cannot
reach tenant "a"'s namespace and a SCAN MATCH pattern built from a tag matches only that namespace.
"""

from __future__ import annotations

import hashlib
import json

PREFIX = "sophia:cache"
EXACT = f"{PREFIX}:exact"
STATS = f"{PREFIX}:stats"
# 128 bits: namespaces of different tenants never collide in practice, and the entry digest below
# covers the raw tenant id and model as well, so even a tag collision could not serve a foreign entry.
TAG_HEX_CHARS = 32


def _encode(*parts: str) -> bytes:
    """An unambiguous encoding: a JSON array, so no choice of strings makes two tuples encode alike."""
    return json.dumps(parts, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def namespace_tag(kind: str, value: str) -> str:
    """A short hex name for a tenant or a model; `kind` keeps a tenant "x" and a model "x" apart."""
    return hashlib.sha256(_encode(f"sophia.cache.{kind}", value)).hexdigest()[:TAG_HEX_CHARS]


def entry_digest(tenant_id: str, model: str, request_key: str) -> str:
    return hashlib.sha256(_encode("sophia.cache.exact.v1", tenant_id, model, request_key)).hexdigest()


def exact_key(tenant_id: str, model: str, request_key: str) -> str:
    tenant, model_tag = namespace_tag("tenant", tenant_id), namespace_tag("model", model)
    return f"{EXACT}:{tenant}:{model_tag}:{entry_digest(tenant_id, model, request_key)}"


def exact_pattern(tenant_id: str, model: str | None = None) -> str:
    """SCAN MATCH pattern for a tenant's exact entries, of one model or (None) of all its models."""
    tenant = namespace_tag("tenant", tenant_id)
    if model is None:
        return f"{EXACT}:{tenant}:*"
    return f"{EXACT}:{tenant}:{namespace_tag('model', model)}:*"


def stats_key(tenant_id: str) -> str:
    """The tenant's hit/miss counters: outside the entry namespace, so never counted or invalidated."""
    return f"{STATS}:{namespace_tag('tenant', tenant_id)}"
