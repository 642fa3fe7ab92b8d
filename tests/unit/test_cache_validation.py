"""The Cache facade refuses bad input, naming the field, before it touches Redis or the model."""

import numpy as np
import pytest

from libs.config import CacheConfig
from libs.errors import InvalidArgument
from libs.redis_store import open_redis, redis_location
from services.cache.domain import MAX_NAME_CHARS, Cache, LookupQuery, StoreCommand, resolve_ttl
from services.cache.guards import QuestionGuards

# Nothing listens on port 1: any call that reached Redis would fail with Unavailable, not InvalidArgument.
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
DIMENSIONS = 8


class NoEmbedder:
    dimensions = DIMENSIONS

    async def embed(self, text: str) -> np.ndarray:
        raise AssertionError("bad input must be refused before anything is embedded")


@pytest.fixture
def cache():
    return Cache(
        open_redis(UNREACHABLE_REDIS, timeout_seconds=0.5, decode_responses=False),
        CacheConfig(ttl_seconds=60, max_entry_bytes=16, max_question_chars=100),
        NoEmbedder(),
        QuestionGuards(frozenset()),
    )


async def _field_of(call) -> str:
    with pytest.raises(InvalidArgument) as raised:
        await call
    return raised.value.field


def lookup(tenant="t", model="m", question="q", embedding=()):
    return LookupQuery(tenant, model, "scope", question, semantic=True, embedding=embedding)


def store(tenant="t", response=b"x", ttl=0, question="q", embedding=()):
    return StoreCommand(tenant, "m", "scope", question, response, ttl, semantic=True, embedding=embedding)


async def test_lookup_names_bad_fields(cache):
    assert await _field_of(cache.lookup(lookup(tenant=""))) == "tenant_id"
    assert await _field_of(cache.lookup(lookup(tenant="t" * (MAX_NAME_CHARS + 1)))) == "tenant_id"
    assert await _field_of(cache.lookup(lookup(tenant="a b"))) == "tenant_id"
    assert await _field_of(cache.lookup(lookup(tenant="a\x00b"))) == "tenant_id"
    assert await _field_of(cache.lookup(lookup(model=""))) == "model"
    assert await _field_of(cache.lookup(lookup(question=""))) == "question"
    assert await _field_of(cache.lookup(lookup(question=" ?! "))) == "question"
    assert await _field_of(cache.lookup(lookup(question="x" * 101))) == "question"


async def test_vectors_must_fit_the_model(cache):
    assert await _field_of(cache.lookup(lookup(embedding=(1.0,) * 3))) == "embedding"
    assert await _field_of(cache.lookup(lookup(embedding=(1.0,) * DIMENSIONS))) == "embedding"  # not unit
    assert await _field_of(cache.lookup(lookup(embedding=(float("nan"),) * DIMENSIONS))) == "embedding"
    assert await _field_of(cache.store(store(embedding=(0.5,) * 3))) == "embedding"


async def test_store_checks_response_size_and_ttl(cache):
    assert await _field_of(cache.store(store(response=b""))) == "response"
    assert await _field_of(cache.store(store(response=b"x" * 17))) == "response"
    assert await _field_of(cache.store(store(ttl=-1))) == "ttl_seconds"
    assert await _field_of(cache.store(store(tenant=""))) == "tenant_id"


async def test_invalidate_and_stats_need_a_tenant(cache):
    assert await _field_of(cache.invalidate("", "m")) == "tenant_id"
    assert await _field_of(cache.stats("")) == "tenant_id"


def test_ttl_zero_means_the_configured_default():
    assert resolve_ttl(0, 3600) == 3600
    assert resolve_ttl(5, 3600) == 5


def test_redis_location_hides_the_password():
    assert redis_location("redis://:hunter2@10.0.0.5:6380/2") == "10.0.0.5:6380/2"
