"""The exact layer is keyed on the normalised question (case, edge punctuation and Unicode compatibility
folded), so different questions can share a key. A stored question must pass the guards before its
answer is served under that key. Runs the real `Cache` on a Redis of its own; the embedder is a stand-in
that gives the same normalised text the same vector, as the real model does."""

import pytest

from services.cache.domain import Layer, LookupQuery, StoreCommand
from tests.cache_doubles import running_cache
from tests.support import throwaway_redis


@pytest.fixture
async def cache(tmp_path, guards):
    async with (
        throwaway_redis(tmp_path, decode_responses=False) as redis,
        running_cache(redis, guards) as started,
    ):
        yield started


async def ask(cache, stored, asked, *, semantic):
    await cache.store(StoreCommand("t", "m", "s", stored, b"answer", semantic=semantic))
    return await cache.lookup(LookupQuery("t", "m", "s", asked, semantic=semantic))


@pytest.mark.parametrize("semantic", [False, True])
@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("What is 4²?", "What is 42?"),
        ("Capitalise the string 'xYz'", "Capitalise the string 'xyz'"),
        ("What does the ?. operator do in TypeScript?", "What does the ?? operator do in TypeScript?"),
        ("What does the ?: operator do in Kotlin?", "What does the :: operator do in Kotlin?"),
    ],
)
async def test_a_different_question_under_the_same_key_is_not_served(cache, stored, asked, semantic):
    result = await ask(cache, stored, asked, semantic=semantic)
    assert result.layer is None and result.veto is not None


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("What is 4²?", "What is 4²?"),
        ("Capitalise the string 'xYz'", "Capitalise   the string 'xYz' "),
        ("How do I reset my PIN?", "  how do i reset my pin"),
    ],
)
async def test_the_same_question_hits_the_exact_layer(cache, stored, asked):
    assert (await ask(cache, stored, asked, semantic=False)).layer == Layer.EXACT
