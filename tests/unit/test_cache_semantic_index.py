"""SemanticIndex: searches asked for together run as one FAISS call per partition, and the expiry sweep
reports each expired entry once, never an entry replaced by a later one."""

import asyncio

import numpy as np
import pytest

from libs.config import SemanticCacheConfig
from services.cache.semantic import CoalescedSearch, IndexedEntry, SemanticIndex

DIMENSIONS = 16


def unit(seed: int, count: int = 1) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSIONS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def entry(key: str, partition: str, expires_at: float = 2e9) -> IndexedEntry:
    return IndexedEntry(key, partition, "complete", expires_at)


class CountedIndex(SemanticIndex):
    """The real index, counting the FAISS calls it makes."""

    def __init__(self) -> None:
        super().__init__(DIMENSIONS, SemanticCacheConfig(candidates=2))
        self.calls: list[tuple[str, int]] = []

    def search_many(self, partition, vectors, now=None):
        self.calls.append((partition, len(vectors)))
        return super().search_many(partition, vectors, now)


async def test_searches_of_one_turn_share_a_call_per_partition_and_get_their_own_neighbours():
    index = CountedIndex()
    vectors = unit(1, 6)
    for number, vector in enumerate(vectors):
        index.add(entry(f"t:{number}", "a" if number < 4 else "b", 2e9), vector, "t")
    searches = CoalescedSearch(index)
    asked = [("a", 0), ("b", 4), ("a", 2), ("a", 3), ("b", 5)]
    found = await asyncio.gather(*(searches.search(partition, vectors[n]) for partition, n in asked))
    assert sorted(index.calls) == [("a", 3), ("b", 2)]
    assert [candidates[0].entry.key for candidates in found] == [f"t:{n}" for _, n in asked]
    assert all(abs(candidates[0].similarity - 1) < 1e-5 for candidates in found)
    # A later turn is a call of its own.
    assert (await searches.search("a", vectors[1]))[0].entry.key == "t:1"
    assert index.calls[-1] == ("a", 1)


async def test_a_failing_search_fails_only_the_lookups_of_its_partition():
    index = CountedIndex()
    vectors = unit(2, 2)
    index.add(entry("t:0", "a"), vectors[0], "t")
    searches = CoalescedSearch(index)
    good = searches.search("a", vectors[0])
    bad = searches.search("b", np.zeros(DIMENSIONS + 1, dtype=np.float32))  # wrong size: FAISS refuses it
    index.add(entry("t:1", "b"), vectors[1], "t")
    assert (await good)[0].entry.key == "t:0"
    with pytest.raises(AssertionError):  # FAISS's check of the query's size
        await bad


def test_the_sweep_reports_each_expired_entry_once_and_not_one_replaced_with_a_later_expiry():
    index = SemanticIndex(DIMENSIONS, SemanticCacheConfig())
    vectors = unit(3, 4)
    index.add(entry("t:early", "p", 100.0), vectors[0], "t")
    index.add(entry("t:renewed", "p", 100.0), vectors[1], "t")
    index.add(entry("t:renewed", "p", 300.0), vectors[1], "t")  # stored again, with a later expiry
    index.add(entry("t:removed", "p", 100.0), vectors[2], "t")
    index.remove("t:removed")
    index.add(entry("t:late", "p", 200.0), vectors[3], "t")
    assert index.expired(now=50.0) == []
    assert index.expired(now=150.0) == ["t:early"]
    index.remove("t:early")
    assert index.expired(now=150.0) == []
    assert index.expired(now=250.0) == ["t:late"]
    assert index.expired(now=400.0) == ["t:renewed"]


def test_items_of_replaced_entries_do_not_pile_up():
    index = SemanticIndex(DIMENSIONS, SemanticCacheConfig())
    vector = unit(4)[0]
    for round_number in range(5000):
        index.add(entry("t:same", "p", 1000.0 + round_number), vector, "t")
    assert len(index) == 1 and len(index._expiries) < 2100
    assert index.expired(now=1e9) == ["t:same"]
