"""The Cache facade refuses bad input, naming the field, before it touches Redis."""

import pytest

from libs.config import CacheConfig
from libs.errors import InvalidArgument
from libs.redis_store import open_redis, redis_location
from services.cache.domain import MAX_NAME_CHARS, Cache, resolve_ttl

# Nothing listens on port 1: any call that reached Redis would fail with Unavailable, not InvalidArgument.
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
def cache():
    return Cache(
        open_redis(UNREACHABLE_REDIS, timeout_seconds=0.5, decode_responses=False),
        CacheConfig(ttl_seconds=60, max_entry_bytes=16),
    )


async def _field_of(call) -> str:
    with pytest.raises(InvalidArgument) as raised:
        await call
    return raised.value.field


async def test_lookup_names_missing_fields(cache):
    assert await _field_of(cache.lookup("", "m", "k")) == "tenant_id"
    assert await _field_of(cache.lookup("t", "", "k")) == "model"
    assert await _field_of(cache.lookup("t", "m", "")) == "request_key"
    assert await _field_of(cache.lookup("t" * (MAX_NAME_CHARS + 1), "m", "k")) == "tenant_id"


async def test_store_checks_response_size_and_ttl(cache):
    assert await _field_of(cache.store("t", "m", "k", b"", 0)) == "response"
    assert await _field_of(cache.store("t", "m", "k", b"x" * 17, 0)) == "response"
    assert await _field_of(cache.store("t", "m", "k", b"x", -1)) == "ttl_seconds"
    assert await _field_of(cache.store("", "m", "k", b"x", 0)) == "tenant_id"


async def test_invalidate_and_stats_need_a_tenant(cache):
    assert await _field_of(cache.invalidate("", "m")) == "tenant_id"
    assert await _field_of(cache.stats("")) == "tenant_id"


def test_ttl_zero_means_the_configured_default():
    assert resolve_ttl(0, 3600) == 3600
    assert resolve_ttl(5, 3600) == 5


def test_redis_location_hides_the_password():
    assert redis_location("redis://:hunter2@10.0.0.5:6380/2") == "10.0.0.5:6380/2"
