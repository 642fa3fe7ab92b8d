"""The Cache facade the servicer calls: validates input, tries the layers in order, counts outcomes.

A lookup is scoped: (tenant, model, scope) must be equal for any hit, where the scope is everything but
the question that shapes the answer. Within it, the exact layer answers the same normalised question;
then the semantic layer searches the nearest cached questions of that scope and lets `SemanticJudge`
decide (threshold, false-hit guards, answer end, ambiguity). The question is embedded at most once per
request: the lookup returns its vector and the store takes it back.

Redis failures become `Unavailable` quickly (short socket timeouts, at most one immediate reconnect) so
that the Gateway can bypass the cache instead of waiting on it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from redis.asyncio import Redis

from libs.config import CacheConfig
from libs.errors import InvalidArgument
from libs.redis_store import unavailable_when_redis_fails
from libs.sentence_embeddings import normalise_text
from services.cache import keys, metrics
from services.cache.counters import CoalescedCounters
from services.cache.entries import EntryStore, StoredEntry
from services.cache.guards import QuestionGuards, Veto
from services.cache.semantic import (
    AnswerEnd,
    Candidate,
    CoalescedSearch,
    IndexedEntry,
    SemanticIndex,
    SemanticJudge,
    SemanticVerdict,
)
from services.cache.sync import IndexSync

log = logging.getLogger(__name__)

# Redis on the same network answers in about a millisecond; a call that takes longer than this means
# Redis is unwell, and the Gateway is better served by a quick UNAVAILABLE than by waiting.
REDIS_TIMEOUT_SECONDS = 1.0
MAX_NAME_CHARS = 256
MAX_SCOPE_CHARS = 1024 * 1024
INT32_MAX = 2**31 - 1
# A vector whose length is further than this from 1 was not L2-normalised.
NORM_TOLERANCE = 1e-3
# The field of a response that names the model which gave it. The Gateway stores its answers as JSON with
# the model that answered (services/gateway/serving/response_cache.py), which after a fallback is not the
# model requested; the entry is keyed by the requested one, and Invalidate of the answering one must
# find it too. Any other response is opaque here and belongs to the requested model only.
ANSWERING_MODEL_FIELD = "model_id"


class Layer(enum.Enum):
    EXACT = "exact"
    SEMANTIC = "semantic"


class Embedder(Protocol):
    dimensions: int

    async def embed(self, text: str) -> np.ndarray: ...


@dataclass(frozen=True)
class LookupQuery:
    tenant_id: str
    model: str
    scope: str
    question: str
    semantic: bool
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True)
class LookupResult:
    layer: Layer | None  # None: a miss
    response: bytes = b""
    similarity: float = 0.0
    embedding: np.ndarray | None = None
    veto: Veto | None = None


@dataclass(frozen=True)
class StoreCommand:
    tenant_id: str
    model: str
    scope: str
    question: str
    response: bytes
    ttl_seconds: int = 0
    semantic: bool = False
    embedding: tuple[float, ...] = ()
    answer_end: str = AnswerEnd.COMPLETE


@dataclass(frozen=True)
class TenantStats:
    exact_hits: int
    semantic_hits: int
    misses: int
    entries: int
    indexed_entries: int
    vetoes: dict[Veto, int] = field(default_factory=dict)

    @property
    def hits(self) -> int:
        return self.exact_hits + self.semantic_hits


def answering_model(response: bytes) -> str | None:
    """The model a response names as the one that gave it (`ANSWERING_MODEL_FIELD` of a JSON object), or
    None when it names none."""
    try:
        value = json.loads(response)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError), or nested deeply
        return None
    model = value.get(ANSWERING_MODEL_FIELD) if isinstance(value, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= MAX_NAME_CHARS else None


def _require_name(field_name: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field_name, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(field_name, f"must be at most {MAX_NAME_CHARS} characters")


def require_tenant(tenant_id: str) -> None:
    _require_name("tenant_id", tenant_id)
    if any(char.isspace() or not char.isprintable() for char in tenant_id):
        raise InvalidArgument("tenant_id", "must not contain whitespace or control characters")


def resolve_ttl(ttl_seconds: int, default_seconds: int) -> int:
    if ttl_seconds < 0:
        raise InvalidArgument("ttl_seconds", "must not be negative (0 uses the configured default)")
    return ttl_seconds or default_seconds


class Cache:
    def __init__(self, redis: Redis, config: CacheConfig, embedder: Embedder, guards: QuestionGuards) -> None:
        self._redis = redis
        self._config = config
        self._embedder = embedder
        self._entries = EntryStore(redis)
        self._counters = CoalescedCounters(redis)
        self._index = SemanticIndex(embedder.dimensions, config.semantic)
        self._searches = CoalescedSearch(self._index)
        self._judge = SemanticJudge(guards, config.semantic)
        self._sync = IndexSync(
            redis, self._entries, self._index_entry, self._forget, self._sweep, config.semantic.sync_block_ms
        )
        metrics.observe_index(self._index.tenant_counts)

    async def start(self) -> None:
        """Rebuilds the semantic index from Redis and follows other replicas' changes from then on."""
        started = time.perf_counter()
        with unavailable_when_redis_fails("cache store"):
            position, loaded = await self._sync.rebuild()
        self._sync.follow(position)
        log.info(
            "semantic index rebuilt from redis: %d entries (%d indexed) in %.1fs",
            loaded, len(self._index), time.perf_counter() - started,
        )  # fmt: skip

    async def close(self) -> None:
        await self._sync.close()
        await self._index.drain()
        await self._redis.aclose()

    # --- lookups -------------------------------------------------------------------------------------

    async def lookup(self, query: LookupQuery) -> LookupResult:
        normalised = self._validate_question(query.tenant_id, query.model, query.scope, query.question)
        given = self._vector("embedding", query.embedding)
        key = keys.entry_key(
            query.tenant_id, self._member(query.model, query.scope, normalised, query.tenant_id)
        )
        with unavailable_when_redis_fails("cache store"):
            response, cached_question = await self._redis.hmget(key, ["response", "question"])
            # The key is the normalised question, which folds case, edge punctuation and compatibility
            # characters, so another question may sit under it ("What is 2³?" under "What is 23?").
            exact_veto = None
            if response is not None and cached_question is not None:
                exact_veto = self._judge.exact_veto(cached_question.decode(), query.question)
                if exact_veto is None:
                    await self._counters.add(query.tenant_id, "hits_exact")
                    metrics.lookups.add(1, {"result": "hit", "layer": Layer.EXACT.value})
                    return LookupResult(Layer.EXACT, response, 1.0, given)
            if not query.semantic:
                return await self._miss(query.tenant_id, exact_veto, LookupResult(None, embedding=given))
        vector = given if given is not None else await self._embedder.embed(normalised)
        partition = keys.scope_digest(query.tenant_id, query.model, query.scope)
        candidates = await self._searches.search(partition, vector)
        with unavailable_when_redis_fails("cache store"):
            verdict, response = await self._judge_semantic(query.question, candidates)
            if verdict.entry is not None and response is not None:
                await self._counters.add(query.tenant_id, "hits_semantic")
                metrics.lookups.add(1, {"result": "hit", "layer": Layer.SEMANTIC.value})
                metrics.semantic_similarity.record(verdict.similarity)
                return LookupResult(Layer.SEMANTIC, response, verdict.similarity, vector)
            # An exact candidate vetoed is usually the semantic layer's best candidate too, vetoed again.
            return await self._miss(
                query.tenant_id,
                verdict.veto or exact_veto,
                LookupResult(None, similarity=verdict.similarity, embedding=vector),
            )

    async def _judge_semantic(
        self, question: str, candidates: list[Candidate]
    ) -> tuple[SemanticVerdict, bytes | None]:
        """The judge's verdict, and the best candidate's response when it may answer. The cached questions
        the judge reads and that response come from Redis in one round trip (the index keeps no questions,
        see semantic.py); a hit cost that round trip before too, for its response."""
        to_read = self._judge.to_read(candidates)
        if not to_read:
            return self._judge.judge(question, candidates), None
        response, questions = await self._entries.read_for_judge([c.entry.key for c in to_read])
        best = candidates[0]
        if questions[0] is None or response is None:
            self._index.remove(best.entry.key)  # gone from Redis (expired or evicted) meanwhile
            return SemanticVerdict(None, best.similarity), None
        read = []
        for candidate, cached_question in zip(to_read, questions, strict=True):
            if cached_question is None:
                self._index.remove(candidate.entry.key)  # gone meanwhile: no longer a cached question
            else:
                read.append(dataclasses.replace(candidate, question=cached_question))
        return self._judge.judge(question, read + candidates[len(to_read) :]), response

    async def _miss(self, tenant_id: str, veto: Veto | None, result: LookupResult) -> LookupResult:
        await self._counters.add(tenant_id, "misses", *([f"veto:{veto.value}"] if veto else []))
        if veto is not None:
            metrics.vetoes.add(1, {"reason": veto.value})
        metrics.lookups.add(1, {"result": "miss"})
        return dataclasses.replace(result, veto=veto)

    # --- stores --------------------------------------------------------------------------------------

    async def store(self, command: StoreCommand) -> int:
        """Stores an answer; returns how many of the tenant's entries were evicted to make room."""
        normalised = self._validate_question(
            command.tenant_id, command.model, command.scope, command.question
        )
        if not command.response:
            raise InvalidArgument("response", "must not be empty")
        if len(command.response) > self._config.max_entry_bytes:
            raise InvalidArgument(
                "response",
                f"{len(command.response)} bytes exceeds the entry limit of "
                f"{self._config.max_entry_bytes} bytes",
            )
        ttl = resolve_ttl(command.ttl_seconds, self._config.ttl_seconds)
        vector = self._vector("embedding", command.embedding)
        if command.semantic and vector is None:
            vector = await self._embedder.embed(normalised)
        partition = keys.scope_digest(command.tenant_id, command.model, command.scope)
        member = self._member(command.model, command.scope, normalised, command.tenant_id)
        fields: dict[str, bytes | str] = {
            "question": command.question,
            "response": command.response,
            "scope": partition,
            "end": command.answer_end,
        }
        answered_by = answering_model(command.response)
        if command.semantic and vector is not None:
            fields["vector"] = vector.astype(np.float32).tobytes()
        with unavailable_when_redis_fails("cache store"):
            expires_at, evicted = await self._entries.put(
                command.tenant_id, member, fields, ttl, self._config.max_entries_per_tenant,
                answered_by if answered_by != command.model else None,
            )  # fmt: skip
        # The event stream brings the same change back; applying it here too makes this replica's next
        # lookup see it without waiting for that round trip.
        key = keys.entry_key(command.tenant_id, member)
        if "vector" in fields:
            entry = IndexedEntry(key, partition, command.answer_end, expires_at)
            self._index.add(entry, vector, keys.tenant_tag_of(key))
        else:
            self._index.remove(key)
        self._forget(evicted)
        if evicted:
            metrics.evictions.add(len(evicted))
        return min(len(evicted), INT32_MAX)

    # --- invalidation and stats ----------------------------------------------------------------------

    async def invalidate(self, tenant_id: str, model: str) -> int:
        """Removes the tenant's entries of `model`, or of every model when `model` is empty."""
        require_tenant(tenant_id)
        if len(model) > MAX_NAME_CHARS:
            raise InvalidArgument("model", f"must be at most {MAX_NAME_CHARS} characters")
        with unavailable_when_redis_fails("cache store"):
            removed = await self._entries.invalidate(tenant_id, model or None)
        self._forget(removed)
        return min(len(removed), INT32_MAX)

    async def stats(self, tenant_id: str) -> TenantStats:
        require_tenant(tenant_id)
        with unavailable_when_redis_fails("cache store"):
            counters = await self._redis.hgetall(keys.stats_key(tenant_id))
            entries = await self._entries.count(tenant_id)
        counts = {name.decode(): int(value) for name, value in counters.items()}
        vetoes = {
            veto: counts[f"veto:{veto.value}"] for veto in Veto if counts.get(f"veto:{veto.value}", 0) > 0
        }
        return TenantStats(
            exact_hits=counts.get("hits_exact", 0),
            semantic_hits=counts.get("hits_semantic", 0),
            misses=counts.get("misses", 0),
            entries=entries,
            indexed_entries=self._index.entries_of(keys.namespace_tag("tenant", tenant_id)),
            vetoes=vetoes,
        )

    # --- helpers -------------------------------------------------------------------------------------

    def _validate_question(self, tenant_id: str, model: str, scope: str, question: str) -> str:
        require_tenant(tenant_id)
        _require_name("model", model)
        if len(scope) > MAX_SCOPE_CHARS:
            raise InvalidArgument("scope", f"must be at most {MAX_SCOPE_CHARS} characters")
        if len(question) > self._config.max_question_chars:
            raise InvalidArgument(
                "question",
                f"{len(question)} characters exceeds the limit of {self._config.max_question_chars}",
            )
        normalised = normalise_text(question)
        if not normalised:
            raise InvalidArgument("question", "must contain text")
        return normalised

    def _vector(self, field_name: str, values: tuple[float, ...]) -> np.ndarray | None:
        if not values:
            return None
        if len(values) != self._embedder.dimensions:
            raise InvalidArgument(
                field_name, f"must have {self._embedder.dimensions} values (or none), got {len(values)}"
            )
        vector = np.asarray(values, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm) or abs(norm - 1) > NORM_TOLERANCE:
            raise InvalidArgument(field_name, "must be L2-normalised (length 1) and finite")
        return vector

    @staticmethod
    def _member(model: str, scope: str, normalised: str, tenant_id: str) -> str:
        return keys.entry_member(model, keys.entry_digest(tenant_id, model, scope, normalised))

    def _index_entry(self, entry: StoredEntry) -> None:
        if not entry.vector:
            self._index.remove(entry.key)
            return
        vector = np.frombuffer(entry.vector, dtype=np.float32)
        if vector.shape[0] != self._embedder.dimensions:
            log.warning("cache entry with a %d-value vector skipped (model changed?)", vector.shape[0])
            return
        indexed = IndexedEntry(entry.key, entry.scope, entry.answer_end, entry.expires_at)
        self._index.add(indexed, vector, keys.tenant_tag_of(entry.key))

    def _forget(self, entry_keys: list[str]) -> None:
        for key in entry_keys:
            self._index.remove(key)

    def _sweep(self) -> None:
        self._forget(self._index.expired())
