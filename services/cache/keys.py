"""Redis key derivation for the cache, pure functions so they can be tested without Redis.

Tenant ids and model names come from callers and may hold ':' or glob characters ('*', '?', '[').
They never appear raw in a key: each is replaced by a hex tag (a hash), so a tenant named "a:b" cannot
reach tenant "a"'s namespace and a SCAN MATCH pattern built from a tag matches only that namespace.

Layout (one hash per entry; Redis is the source of truth, the semantic index is rebuilt from it):
- `sophia:cache:entry:<tenant>:<model>:<digest>`  hash: question, response, vector, scope, answer end,
  and the answering model's tag when another model than the requested one answered; expires with the
  entry's TTL. The digest covers tenant, model, scope and the normalised question, so
  the exact layer is one HMGET.
- `sophia:cache:expiry:<tenant>`  sorted set of the tenant's entries (`<model>:<digest>`) by expiry
  time: counts live entries, evicts the soonest to expire beyond the per-tenant limit, lists a model's
  entries for Invalidate.
- `sophia:cache:answered:<tenant>`  sorted set, by expiry time, of `<answering model>:<member>` for each
  entry answered by another model than the one requested (a fallback): Invalidate of a model finds the
  answers it gave under other models' names through it. The entry's `answered` field holds the tag, so
  that replacing or evicting the entry removes its member here too.
- `sophia:cache:events`  a stream of puts and deletions that keeps every replica's index in step.
- `sophia:cache:stats:<tenant>`  hash of counters (hits per layer, misses, vetoes per reason).
"""

from __future__ import annotations

import hashlib
import json

PREFIX = "sophia:cache"
ENTRY = f"{PREFIX}:entry"
EXPIRY = f"{PREFIX}:expiry"
ANSWERED = f"{PREFIX}:answered"
STATS = f"{PREFIX}:stats"
EVENTS = f"{PREFIX}:events"
# 128 bits: namespaces of different tenants never collide in practice, and the entry digest below
# covers the raw tenant id and model as well, so even a tag collision could not serve a foreign entry.
TAG_HEX_CHARS = 32


def _encode(*parts: str) -> bytes:
    """An unambiguous encoding: a JSON array, so no choice of strings makes two tuples encode alike."""
    return json.dumps(parts, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def namespace_tag(kind: str, value: str) -> str:
    """A short hex name for a tenant or a model; `kind` keeps a tenant "x" and a model "x" apart."""
    return hashlib.sha256(_encode(f"sophia.cache.{kind}", value)).hexdigest()[:TAG_HEX_CHARS]


def scope_digest(tenant_id: str, model: str, scope: str) -> str:
    """The semantic index partition: neighbours are searched only among entries of the same digest."""
    return hashlib.sha256(_encode("sophia.cache.scope.v2", tenant_id, model, scope)).hexdigest()[
        :TAG_HEX_CHARS
    ]


def entry_digest(tenant_id: str, model: str, scope: str, normalised_question: str) -> str:
    return hashlib.sha256(
        _encode("sophia.cache.entry.v2", tenant_id, model, scope, normalised_question)
    ).hexdigest()


def entry_member(model: str, digest: str) -> str:
    """An entry's name within its tenant (the member of the tenant's expiry set)."""
    return f"{namespace_tag('model', model)}:{digest}"


def entry_key(tenant_id: str, member: str) -> str:
    return f"{ENTRY}:{namespace_tag('tenant', tenant_id)}:{member}"


def entry_prefix(tenant_id: str) -> str:
    return f"{ENTRY}:{namespace_tag('tenant', tenant_id)}:"


def model_member_prefix(model: str) -> str:
    return f"{namespace_tag('model', model)}:"


def expiry_key(tenant_id: str) -> str:
    return f"{EXPIRY}:{namespace_tag('tenant', tenant_id)}"


def answered_key(tenant_id: str) -> str:
    """The tenant's entries by the model that answered them, where it is not the one requested."""
    return f"{ANSWERED}:{namespace_tag('tenant', tenant_id)}"


def answered_member(answered_model: str, member: str) -> str:
    return f"{namespace_tag('model', answered_model)}:{member}"


def stats_key(tenant_id: str) -> str:
    """The tenant's counters: outside the entry namespace, so never counted or invalidated."""
    return f"{STATS}:{namespace_tag('tenant', tenant_id)}"


def tenant_tag_of(entry: str) -> str:
    """The tenant tag of an entry key (`sophia:cache:entry:<tenant>:<model>:<digest>`)."""
    return entry[len(ENTRY) + 1 :].split(":", 1)[0]
