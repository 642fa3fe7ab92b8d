"""The semantic index's memory: it keeps no copy of the cached questions (a question may be 16k
characters, ten times its vector; the judge reads the few it needs from Redis), and it is bounded across
tenants (Redis bounds each tenant, not their sum). Runs the real `Cache` on a Redis of its own."""

import asyncio
import tracemalloc

import numpy as np
import pytest

from libs.config import CacheConfig, SemanticCacheConfig
from libs.sentence_embeddings import normalise_text
from services.cache import keys
from services.cache.domain import Cache, Layer, LookupQuery, StoreCommand
from services.cache.guards import Veto
from services.cache.semantic import IndexedEntry, SemanticIndex
from tests.cache_doubles import DIMENSIONS, HashEmbedder, running_cache, unit

LONG_QUESTIONS = 100
QUESTION_CHARS = 16_000
# Everything an entry costs the index here but its vector (FAISS's, not traced): keys, ids, expiry.
MAX_BYTES_PER_ENTRY = 4096


def long_question(number: int) -> str:
    return f"{'Please read this long question. ' * (QUESTION_CHARS // 32)} Which is item {number}?"


@pytest.fixture
async def cache(redis, guards):
    async with running_cache(redis, guards) as started:
        yield started


async def settled() -> None:
    """Lets the index follow the events of the stores made (its own, applied again)."""
    await asyncio.sleep(0.2)


async def test_storing_long_questions_keeps_no_copy_of_them_in_the_index(cache):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(LONG_QUESTIONS):
            await cache.store(StoreCommand("t", "m", "s", long_question(number), b"answer", semantic=True))
        await settled()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert (await cache.stats("t")).indexed_entries == LONG_QUESTIONS
    assert held / LONG_QUESTIONS < MAX_BYTES_PER_ENTRY, held / LONG_QUESTIONS


async def test_an_index_rebuilt_from_redis_keeps_no_copy_of_the_questions(redis, guards):
    # Neither cache follows the event stream: cancelling a follower whose XREAD is still connecting can
    # stall in redis-py, and the rebuild is what is measured here.
    writer = Cache(redis, CacheConfig(), HashEmbedder(), guards)
    for number in range(LONG_QUESTIONS):
        await writer.store(StoreCommand("t", "m", "s", long_question(number), b"answer", semantic=True))
    replica = Cache(redis, CacheConfig(), HashEmbedder(), guards)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await replica._sync.rebuild()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert (await replica.stats("t")).indexed_entries == LONG_QUESTIONS
    assert held / LONG_QUESTIONS < MAX_BYTES_PER_ENTRY, held / LONG_QUESTIONS
    # It answers from them: the judge reads the cached questions from Redis.
    asked = long_question(7).replace("Which is item", "Which is the item")
    vector = tuple(unit(normalise_text(long_question(7))))
    result = await replica.lookup(LookupQuery("t", "m", "s", asked, semantic=True, embedding=vector))
    assert result.layer == Layer.SEMANTIC and result.response == b"answer"


async def test_long_questions_that_differ_past_the_models_reach_are_still_told_apart(redis, guards):
    """The model embeds only a question's beginning; the guards read all of it (so keeping a truncated
    question for them would serve one account's answer to another)."""
    cache = Cache(redis, CacheConfig(), HashEmbedder(reach=256), guards)
    await cache.start()
    try:
        preamble = "Please read this long question. " * 400
        await cache.store(
            StoreCommand("t", "m", "s", f"{preamble}Reset the PIN for account 48231", b"a", semantic=True)
        )
        asked = f"{preamble}Reset the PIN for account 48213"
        result = await cache.lookup(LookupQuery("t", "m", "s", asked, semantic=True))
        assert (result.layer, result.similarity, result.veto) == (None, pytest.approx(1.0), Veto.NUMBER)
        paraphrase = f"{preamble}please reset the PIN for account 48231"
        assert (await cache.lookup(LookupQuery("t", "m", "s", paraphrase, semantic=True))).layer == (
            Layer.SEMANTIC
        )
    finally:
        await cache.close()


def close_to(vector: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """A unit vector at about `cosine` to `vector`."""
    noise = np.random.default_rng(seed).standard_normal(DIMENSIONS).astype(np.float32)
    noise -= noise.dot(vector) * vector
    noise /= np.linalg.norm(noise)
    moved = cosine * vector + np.sqrt(1 - cosine**2) * noise
    return moved / np.linalg.norm(moved)


SPIDER_LEGS = "How many legs does a spider have?"
SPIDER_EYES = "How many eyes does a spider have?"


async def store_with(cache, question: str, vector: np.ndarray) -> None:
    await cache.store(
        StoreCommand("t", "m", "s", question, question.encode(), semantic=True, embedding=tuple(vector))
    )


async def ask_with(cache, question: str, vector: np.ndarray):
    return await cache.lookup(LookupQuery("t", "m", "s", question, semantic=True, embedding=tuple(vector)))


async def test_a_runner_up_gone_from_redis_no_longer_makes_a_lookup_ambiguous(cache, redis):
    legs = unit("legs")
    await store_with(cache, SPIDER_LEGS, legs)
    await store_with(cache, SPIDER_EYES, close_to(legs, 0.995, 1))
    assert (await ask_with(cache, "How many legs do spiders have?", legs)).veto == Veto.AMBIGUOUS
    # Gone from Redis without the index hearing of it (as between an eviction and its event).
    eyes_key = keys.entry_key("t", cache._member("m", "s", normalise_text(SPIDER_EYES), "t"))
    assert await redis.hget(eyes_key, "question") == SPIDER_EYES.encode()
    await redis.delete(eyes_key)
    result = await ask_with(cache, "How many legs do spiders have?", legs)
    assert (result.layer, result.response) == (Layer.SEMANTIC, SPIDER_LEGS.encode())
    assert (await cache.stats("t")).indexed_entries == 1


async def test_a_best_candidate_gone_from_redis_is_a_miss_and_leaves_the_index(cache, redis):
    legs = unit("legs")
    await store_with(cache, SPIDER_LEGS, legs)
    for key in await redis.keys("sophia:cache:entry:*"):
        await redis.delete(key)
    result = await ask_with(cache, "How many legs do spiders have?", legs)
    assert (result.layer, result.veto) == (None, None)
    assert (await cache.stats("t")).indexed_entries == 0


# --- the bound across tenants -----------------------------------------------------------------------


def entry(key: str, expires_at: float) -> IndexedEntry:
    return IndexedEntry(key, "p", "complete", expires_at)


def test_at_its_bound_the_index_drops_the_entry_soonest_to_expire():
    index = SemanticIndex(DIMENSIONS, SemanticCacheConfig(max_indexed_entries=2))
    vectors = [unit(str(n)) for n in range(5)]
    index.add(entry("sophia:cache:entry:a:1", 100.0), vectors[0], "a")
    index.add(entry("sophia:cache:entry:b:1", 300.0), vectors[1], "b")
    index.add(entry("sophia:cache:entry:b:2", 50.0), vectors[2], "b")  # the soonest itself: not kept
    assert (len(index), index.tenant_counts()) == (2, {"a": 1, "b": 1})
    assert "sophia:cache:entry:b:2" not in index
    index.add(entry("sophia:cache:entry:b:1", 500.0), vectors[1], "b")  # stored again: no room needed
    assert (len(index), index.tenant_counts()) == (2, {"a": 1, "b": 1})
    index.add(entry("sophia:cache:entry:b:3", 400.0), vectors[3], "b")
    assert index.tenant_counts() == {"b": 2} and "sophia:cache:entry:a:1" not in index
    assert "sophia:cache:entry:a:1" not in [found.entry.key for found in index.search("p", vectors[0], now=0)]
    assert index.expired(now=1000.0) == ["sophia:cache:entry:b:3", "sophia:cache:entry:b:1"]


async def test_the_index_is_bounded_across_tenants_and_dropped_entries_still_answer_exactly(redis, guards):
    config = CacheConfig(semantic=SemanticCacheConfig(max_indexed_entries=4))
    cache = Cache(redis, config, HashEmbedder(), guards)
    await cache.start()
    try:
        questions = [f"How tall is building number {n}?" for n in range(3)]
        for tenant, ttl in (("a", 100), ("b", 200)):
            for n, question in enumerate(questions):
                await cache.store(StoreCommand(tenant, "m", "s", question, b"x", ttl + n, semantic=True))
        await settled()
        counts = [(await cache.stats(tenant)) for tenant in ("a", "b")]
        assert [(stats.entries, stats.indexed_entries) for stats in counts] == [(3, 1), (3, 3)]
        # Out of the index (their vectors no longer searched) but still in Redis for the exact layer.
        vector = tuple(unit(normalise_text(questions[0])))
        dropped = await cache.lookup(LookupQuery("a", "m", "s", "x", semantic=True, embedding=vector))
        assert dropped.layer is None and dropped.similarity < 0.99
        exact = await cache.lookup(LookupQuery("a", "m", "s", questions[0], semantic=True))
        assert exact.layer == Layer.EXACT
    finally:
        await cache.close()
