"""The rate limiter against a real Redis: a request's tokens ride on the key's next admission (one
script call per request, not two), and tokens of keys with no request since reach Redis with `flush`."""

from __future__ import annotations

import pytest

from libs.config import AuthConfig
from libs.errors import ResourceExhausted
from services.gateway.access.api_keys import KeyRing
from services.gateway.access.control import AccessControl
from services.gateway.domain import Principal

KEY = Principal(tenant_id="t", key_id="key_tpm", requests_per_minute=1000, tokens_per_minute=100)


async def _script_calls(client) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


async def _window_tokens(client, key_id: str) -> int:
    (window,) = [key async for key in client.scan_iter(f"gateway:ratelimit:{{{key_id}}}:*")]
    return int(await client.hget(window, "tokens") or 0)


@pytest.fixture
async def access(redis_client):
    access = AccessControl.over_redis(KeyRing(AuthConfig()), redis_client, key_cache_seconds=1)
    yield access
    await access.close()


async def test_a_request_costs_one_script_call_its_tokens_riding_on_the_next(access, redis_client):
    await access.admit(KEY, 10)  # loads the script
    before = await _script_calls(redis_client)
    for _ in range(5):
        access.charge(KEY, 15)
        await access.admit(KEY, 10)
    assert await _script_calls(redis_client) - before == 5
    assert await _window_tokens(redis_client, KEY.key_id) == 75
    access.charge(KEY, 20)
    # 95 used (the last 20 added by this very call, before its check) + 10 estimated would pass 100.
    with pytest.raises(ResourceExhausted, match="100 tokens per minute"):
        await access.admit(KEY, 10)
    assert await _window_tokens(redis_client, KEY.key_id) == 95


async def test_tokens_of_keys_with_no_request_since_are_added_by_a_flush(access, redis_client):
    other = Principal(tenant_id="t", key_id="key_other", tokens_per_minute=1000)
    await access.admit(KEY, 1)
    await access.admit(other, 1)
    access.charge(KEY, 30)
    access.charge(other, 7)
    access.charge(other, 5)
    await access.flush_charges()
    assert await _window_tokens(redis_client, KEY.key_id) == 30
    assert await _window_tokens(redis_client, other.key_id) == 12
    await access.flush_charges()  # nothing owed: nothing added twice
    assert await _window_tokens(redis_client, other.key_id) == 12
