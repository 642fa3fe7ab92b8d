"""Invalidate of a model removes the answers that model gave, also those stored under another requested
model (the Gateway stores a fallback's answer under the model asked for, with the answering model in the
response). Runs the real `Cache` on a Redis of its own."""

import json

import pytest

from libs.config import CacheConfig
from libs.sentence_embeddings import normalise_text
from services.cache import domain, keys
from services.cache.domain import Layer, LookupQuery, StoreCommand
from tests.cache_doubles import running_cache

ENTRY_LIMIT = 3
FRANCE = "What is the capital of France?"


@pytest.fixture
async def cache(redis, guards):
    async with running_cache(redis, guards, CacheConfig(max_entries_per_tenant=ENTRY_LIMIT)) as started:
        yield started


def answer(model_id: str, text: str = "Paris") -> bytes:
    """A response as the Gateway serialises it (services/gateway/serving/response_cache.py)."""
    return json.dumps({"model_id": model_id, "provider": "p", "completion": {"content": text}}).encode()


async def store(cache, question, *, requested, answered, tenant="dev", ttl=0):
    await cache.store(
        StoreCommand(tenant, requested, "s", question, answer(answered), ttl_seconds=ttl, semantic=True)
    )


async def lookup(cache, question, *, requested, tenant="dev"):
    return await cache.lookup(LookupQuery(tenant, requested, "s", question, semantic=True))


async def test_invalidating_the_answering_model_removes_a_fallbacks_answer(cache):
    await store(cache, FRANCE, requested="fail500-gpt", answered="good-gpt")
    await store(cache, "How many legs does a spider have?", requested="good-gpt", answered="good-gpt")
    await store(cache, "How tall is Mont Blanc?", requested="fail500-gpt", answered="fail500-gpt")
    assert (await lookup(cache, FRANCE, requested="fail500-gpt")).layer == Layer.EXACT

    assert await cache.invalidate("dev", "good-gpt") == 2
    assert (await lookup(cache, FRANCE, requested="fail500-gpt")).layer is None
    assert (await lookup(cache, "How many legs does a spider have?", requested="good-gpt")).layer is None
    # The requested model's own answer stays; the fallback's answer left both layers.
    assert (await lookup(cache, "How tall is Mont Blanc?", requested="fail500-gpt")).layer == Layer.EXACT
    assert (await cache.stats("dev")).indexed_entries == 1
    assert await cache.invalidate("dev", "good-gpt") == 0


async def test_invalidating_the_requested_model_still_removes_its_entries(cache, redis):
    await store(cache, FRANCE, requested="fail500-gpt", answered="good-gpt")
    assert await cache.invalidate("dev", "fail500-gpt") == 1
    assert (await lookup(cache, FRANCE, requested="fail500-gpt")).layer is None
    # Its record under the answering model went with it: nothing is left to remove or count twice.
    assert await redis.zcard(keys.answered_key("dev")) == 0
    assert await cache.invalidate("dev", "good-gpt") == 0


async def test_entries_stored_before_the_answering_model_was_recorded_are_invalidated_as_before(cache):
    # Written as the previous version did: no answering model recorded.
    member = cache._member("fail500-gpt", "s", normalise_text(FRANCE), "dev")
    await cache._entries.put("dev", member, {"question": FRANCE, "response": answer("good-gpt")}, 60, 10)
    assert (await lookup(cache, FRANCE, requested="fail500-gpt")).layer == Layer.EXACT
    assert await cache.invalidate("dev", "good-gpt") == 0
    assert await cache.invalidate("dev", "fail500-gpt") == 1
    assert (await lookup(cache, FRANCE, requested="fail500-gpt")).layer is None


async def test_other_tenants_answers_of_the_model_stay(cache):
    await store(cache, FRANCE, requested="fail500-gpt", answered="good-gpt", tenant="dev")
    await store(cache, FRANCE, requested="fail500-gpt", answered="good-gpt", tenant="other")
    assert await cache.invalidate("dev", "good-gpt") == 1
    assert (await lookup(cache, FRANCE, requested="fail500-gpt", tenant="other")).layer == Layer.EXACT
    assert (await cache.stats("other")).indexed_entries == 1


async def test_an_entry_replaced_by_another_models_answer_belongs_to_the_new_one_only(cache, redis):
    await store(cache, FRANCE, requested="fail500-gpt", answered="good-gpt")
    await store(cache, FRANCE, requested="fail500-gpt", answered="other-gpt")
    assert await redis.zcard(keys.answered_key("dev")) == 1
    assert await cache.invalidate("dev", "good-gpt") == 0
    assert (await lookup(cache, FRANCE, requested="fail500-gpt")).layer == Layer.EXACT
    assert await cache.invalidate("dev", "other-gpt") == 1


async def test_eviction_at_the_entry_limit_forgets_the_answering_model_too(cache, redis):
    questions = [f"How tall is building number {n}?" for n in range(ENTRY_LIMIT + 2)]
    for n, question in enumerate(questions):
        await store(cache, question, requested="fail500-gpt", answered="good-gpt", ttl=100 + n)
    # The two soonest to expire were evicted, with their records under the answering model.
    assert await redis.zcard(keys.answered_key("dev")) == ENTRY_LIMIT
    assert (await cache.stats("dev")).entries == ENTRY_LIMIT
    assert await cache.invalidate("dev", "good-gpt") == ENTRY_LIMIT
    assert (await cache.stats("dev")).entries == 0


async def test_invalidating_every_model_clears_the_answering_records(cache, redis):
    await store(cache, FRANCE, requested="fail500-gpt", answered="good-gpt")
    await store(cache, "How tall is Mont Blanc?", requested="good-gpt", answered="good-gpt")
    assert await cache.invalidate("dev", "") == 2
    assert await redis.zcard(keys.answered_key("dev")) == 0
    assert (await cache.stats("dev")).indexed_entries == 0


@pytest.mark.parametrize(
    ("response", "model"),
    [
        (answer("good-gpt"), "good-gpt"),
        (b'{"answer": "dummy"}', None),  # a response that names no model
        (b"\x00raw\xffbytes", None),
        (b'{"model_id": 7}', None),
        (b'{"model_id": ""}', None),
        (json.dumps({"model_id": "m" * 257}).encode(), None),
        (b"[" * 100_000, None),  # nested past the parser's recursion limit
    ],
)
def test_the_answering_model_is_read_from_the_gateways_response(response, model):
    assert domain.answering_model(response) == model
