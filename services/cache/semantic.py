"""The semantic layer: which cached question, if any, may answer a new one.

`SemanticIndex` keeps this replica's view of the indexed entries (FAISS vectors per scope partition,
plus each entry's answer end and expiry) in step with Redis. The cached questions stay in Redis: a
question may be 16k characters, ten times its vector, and the guards read only the few candidates that
reach the threshold, which the lookup reads from Redis together with the best one's response (see
`SemanticJudge.to_read`). `SemanticJudge` decides on the candidates a search returns: the best candidate
must reach the similarity threshold, pass the false-hit guards (guards.py) and not be a truncated or
refused answer, and no different cached question may sit within the ambiguity margin of it. The judge is
plain Python over plain data: the servicer's lookups and tools/eval_semantic_cache run the same code.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from libs.config import SemanticCacheConfig
from services.cache import metrics
from services.cache.guards import QuestionGuards, QuestionProfile, Veto
from services.cache.index import VectorIndex
from services.cache.keys import tenant_tag_of

log = logging.getLogger(__name__)

PROFILE_CACHE_SIZE = 4096
EXPIRY_HEAP_SLACK = 1024
# cache.semantic.max_indexed_entries: Redis bounds each tenant (cache.max_entries_per_tenant, 100k by
# default) but not their sum, and the index lives in every replica's memory: about 2.3 KiB an entry (the
# 384-float vector is 1.5 KiB of it), so the default 400k entries take about 0.9 GiB of the pod's 3 GiB
# beside the embedding model. At the bound the entry soonest to expire leaves the index (it stays in
# Redis and keeps answering exact lookups); a tenant at its own limit holds at most a quarter of it.


class AnswerEnd:
    COMPLETE = "complete"
    TRUNCATED = "truncated"
    REFUSAL = "refusal"


_ANSWER_ENDS = {end: end for end in (AnswerEnd.COMPLETE, AnswerEnd.TRUNCATED, AnswerEnd.REFUSAL)}
_REFUSED_ENDS = frozenset({AnswerEnd.TRUNCATED, AnswerEnd.REFUSAL})


@dataclass(slots=True)  # slots: one of these per indexed entry, in every replica
class IndexedEntry:
    key: str  # the entry's Redis key
    partition: str
    answer_end: str
    expires_at: float  # unix seconds


@dataclass(frozen=True)
class Candidate:
    entry: IndexedEntry
    similarity: float
    # The cached question as stored, read from Redis for the candidates the judge reads (`to_read`).
    question: str = ""


@dataclass(frozen=True)
class SemanticVerdict:
    """`entry` is set when the semantic layer may answer; otherwise `veto` says why the best candidate
    (if any reached the threshold) was refused. `similarity` is the best candidate's."""

    entry: IndexedEntry | None
    similarity: float = 0.0
    veto: Veto | None = None


class SemanticIndex:
    def __init__(self, dimensions: int, config: SemanticCacheConfig) -> None:
        self._max_entries = config.max_indexed_entries
        self._vectors = VectorIndex(
            dimensions, ivf_min_entries=config.ivf_min_entries, nprobe=config.ivf_nprobe
        )
        self._entries: dict[int, IndexedEntry] = {}
        # (expiry, id) of every entry added; items of entries removed since are skipped when they come up.
        self._expiries: list[tuple[float, int]] = []
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._per_tenant: dict[str, int] = {}
        self._candidates = config.candidates
        self._full_logged = False

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._ids

    def entries_of(self, tenant_tag: str) -> int:
        return self._per_tenant.get(tenant_tag, 0)

    def tenant_counts(self) -> dict[str, int]:
        return dict(self._per_tenant)

    def add(self, entry: IndexedEntry, vector: np.ndarray, tenant_tag: str) -> None:
        known = self._ids.get(entry.key)
        if known is not None and self._entries[known] == entry:
            return  # the same entry again (a replica sees its own stores come back as events)
        self.remove(entry.key)
        # One string per answer end instead of a copy per entry read from Redis.
        entry.answer_end = _ANSWER_ENDS.get(entry.answer_end, entry.answer_end)
        entry_id = next(self._next_id)
        self._vectors.add(entry.partition, entry_id, vector)
        self._entries[entry_id] = entry
        heapq.heappush(self._expiries, (entry.expires_at, entry_id))
        if len(self._expiries) > 2 * len(self._entries) + EXPIRY_HEAP_SLACK:
            # Many entries were replaced or evicted long before they expire: drop their items.
            self._expiries = [(kept.expires_at, kept_id) for kept_id, kept in self._entries.items()]
            heapq.heapify(self._expiries)
        self._ids[entry.key] = entry_id
        self._per_tenant[tenant_tag] = self._per_tenant.get(tenant_tag, 0) + 1
        if len(self._entries) > self._max_entries:
            self._drop_soonest_to_expire(len(self._entries) - self._max_entries)

    def _drop_soonest_to_expire(self, count: int) -> None:
        """Keeps the index within its bound across tenants (the entry just added may be the one dropped)."""
        dropped = 0
        while dropped < count and self._expiries:
            _, entry_id = heapq.heappop(self._expiries)
            entry = self._entries.get(entry_id)
            if entry is not None:  # otherwise removed or replaced since
                self.remove(entry.key)
                dropped += 1
        if dropped:
            metrics.index_evictions.add(dropped)
            if not self._full_logged:
                self._full_logged = True
                log.warning(
                    "semantic index full (%d entries across tenants): the entries soonest to expire leave "
                    "it and answer exact lookups only", self._max_entries,
                )  # fmt: skip

    def remove(self, key: str) -> bool:
        entry_id = self._ids.pop(key, None)
        if entry_id is None:
            return False
        self._vectors.remove(entry_id)
        del self._entries[entry_id]
        tenant_tag = tenant_tag_of(key)
        left = self._per_tenant.get(tenant_tag, 1) - 1
        if left:
            self._per_tenant[tenant_tag] = left
        else:
            self._per_tenant.pop(tenant_tag, None)
        return True

    def search(self, partition: str, vector: np.ndarray, now: float | None = None) -> list[Candidate]:
        """The best live candidates of the partition, best first."""
        return self.search_many(partition, vector.reshape(1, -1), now)[0]

    def search_many(
        self, partition: str, vectors: np.ndarray, now: float | None = None
    ) -> list[list[Candidate]]:
        """`search` for each row of `vectors`, in one pass over the partition."""
        now = time.time() if now is None else now
        found = []
        for neighbours in self._vectors.search_many(partition, vectors, self._candidates):
            live = []
            for entry_id, similarity in neighbours:
                entry = self._entries.get(entry_id)
                if entry is not None and entry.expires_at > now:
                    live.append(Candidate(entry, similarity))
            found.append(live)
        return found

    def expired(self, now: float | None = None) -> list[str]:
        """The keys of indexed entries that expired by `now`, each reported once. Runs every second on the
        event loop: a heap by expiry makes it cost what expired, not what is indexed (a scan of 100k
        entries held the loop 2-6 ms here, every second)."""
        now = time.time() if now is None else now
        found = []
        while self._expiries and self._expiries[0][0] <= now:
            _, entry_id = heapq.heappop(self._expiries)
            entry = self._entries.get(entry_id)
            if entry is not None:  # otherwise removed or replaced since (a new id has its own item)
                found.append(entry.key)
        return found

    async def drain(self) -> None:
        await self._vectors.drain()


class CoalescedSearch:
    """Searches asked for in the same turn of the event loop run together, one FAISS call per partition.
    Lookups embedded in one batch get their vectors at once and so ask for their searches in the same
    turn; a flat partition is then read from memory once for all of them instead of once each."""

    def __init__(self, index: SemanticIndex) -> None:
        self._index = index
        self._waiting: dict[str, list[tuple[np.ndarray, asyncio.Future[list[Candidate]]]]] = {}

    def search(self, partition: str, vector: np.ndarray) -> asyncio.Future[list[Candidate]]:
        loop = asyncio.get_running_loop()
        if not self._waiting:
            # Runs after the callbacks already due in this turn: the other lookups of the batch.
            loop.call_soon(self._run)
        future: asyncio.Future[list[Candidate]] = loop.create_future()
        self._waiting.setdefault(partition, []).append((vector, future))
        return future

    def _run(self) -> None:
        waiting, self._waiting = self._waiting, {}
        now = time.time()
        for partition, asked in waiting.items():
            try:
                found = self._index.search_many(partition, np.stack([vector for vector, _ in asked]), now)
            except Exception as exc:  # each waiting lookup fails alone, as its own search would have
                for _, future in asked:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), candidates in zip(asked, found, strict=True):
                if not future.done():
                    future.set_result(candidates)


class SemanticJudge:
    def __init__(self, guards: QuestionGuards, config: SemanticCacheConfig) -> None:
        self._guards = guards
        self._threshold = config.similarity_threshold
        self._margin = config.ambiguity_margin
        # Cached questions come back as candidates again and again; their profiles are read-only.
        self._cached_profile = functools.lru_cache(maxsize=PROFILE_CACHE_SIZE)(guards.profile)

    def to_read(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates whose cached questions `judge` reads, best first: none when the best one is
        refused on its similarity or answer end alone; else the best one and the runners-up within the
        ambiguity margin of it."""
        if not candidates:
            return []
        best = candidates[0]
        if best.similarity < self._threshold or best.entry.answer_end in _REFUSED_ENDS:
            return []
        close = itertools.takewhile(
            lambda other: best.similarity - other.similarity <= self._margin, candidates[1:]
        )
        return [best, *close]

    def judge(self, question: str, candidates: list[Candidate]) -> SemanticVerdict:
        """`question` as asked (not normalised: the guards read case and punctuation). It is read only when
        a candidate reaches the guards, which most lookups' best candidate does not. The candidates of
        `to_read` must carry their cached questions."""
        if not candidates:
            return SemanticVerdict(None)
        best = candidates[0]
        if best.similarity < self._threshold:
            return SemanticVerdict(None, best.similarity)
        if best.entry.answer_end == AnswerEnd.TRUNCATED:
            return SemanticVerdict(None, best.similarity, Veto.TRUNCATED)
        if best.entry.answer_end == AnswerEnd.REFUSAL:
            return SemanticVerdict(None, best.similarity, Veto.REFUSAL)
        cached = self._cached_profile(best.question)
        veto = self._guards.compare(cached, self._guards.profile(question)).veto
        if veto is not None:
            return SemanticVerdict(None, best.similarity, veto)
        if self._ambiguous(cached, best, candidates[1:]):
            return SemanticVerdict(None, best.similarity, Veto.AMBIGUOUS)
        return SemanticVerdict(best.entry, best.similarity)

    def exact_veto(self, cached_question: str, question: str) -> Veto | None:
        """Whether the cached question under the same exact key may answer `question`. The exact key is the
        normalised question (NFKC, case and edge punctuation folded), which merges different questions:
        "2³" and "23", "?." and "??", 'AbC' and 'abc'. The guards read what the normalisation drops."""
        if cached_question.split() == question.split():
            return None  # the same text, spaced differently
        return self._guards.compare(
            self._cached_profile(cached_question), self._guards.profile(question)
        ).veto

    def _ambiguous(self, cached: QuestionProfile, best: Candidate, others: list[Candidate]) -> bool:
        """A runner-up within the margin that is a different question from the best one: the question
        sits between two cached questions that want different answers."""
        for other in others:
            if best.similarity - other.similarity > self._margin:
                return False
            runner_up = self._cached_profile(other.question)
            if self._guards.compare(cached, runner_up).veto is not None:
                return True
        return False
