"""The rate limiter against a real Redis: a busy key is admitted from leases (a few script calls, not one
per request), Redis' count never falls below what was admitted, unused requests go back when a lease
ends, and tokens charged here reach Redis with the key's next call to it or with the flush."""

from __future__ import annotations

import asyncio

import pytest

from libs.config import AuthConfig
from libs.errors import ResourceExhausted
from services.gateway.access.api_keys import KeyRing
from services.gateway.access.control import AccessControl, redis_breaker
from services.gateway.access.key_store import KeyStore
from services.gateway.access.rate_limits import LEASE_SECONDS, RateLimiter
from services.gateway.domain import Principal

KEY = Principal(tenant_id="t", key_id="key_busy", requests_per_minute=100_000, tokens_per_minute=100)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _access(redis_client, clock: Clock) -> AccessControl:
    """A replica's access control whose leases run on `clock` (Redis' own clock still sets windows)."""
    return AccessControl(
        KeyRing(AuthConfig()),
        KeyStore(redis_client),
        RateLimiter(redis_client, clock),
        key_cache_seconds=1,
        breaker=redis_breaker(redis_client),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def access(redis_client, clock):
    access = _access(redis_client, clock)
    yield access
    await access.close()


async def _script_calls(client) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


async def _window(client, key_id: str) -> dict[str, int]:
    (window,) = [key async for key in client.scan_iter(f"gateway:ratelimit:{{{key_id}}}:*")]
    return {field: int(value) for field, value in (await client.hgetall(window)).items()}


async def _admit_busily(access: AccessControl, clock: Clock, key: Principal, count: int) -> int:
    """`count` requests 0.1 ms apart; how many were admitted."""
    admitted = 0
    for _ in range(count):
        clock.now += 0.0001
        try:
            await access.admit(key, 0)
            admitted += 1
        except ResourceExhausted:
            pass
    return admitted


async def test_a_busy_key_is_admitted_from_leases_and_unused_requests_go_back(access, clock, redis_client):
    await access.admit(KEY, 0)  # loads the script
    before = await _script_calls(redis_client)
    assert await _admit_busily(access, clock, KEY, 300) == 300
    assert await _script_calls(redis_client) - before <= 10  # 300 on a limiter without leases
    counted = (await _window(redis_client, KEY.key_id))["requests"]
    assert counted >= 301  # never below what was admitted
    clock.now += LEASE_SECONDS
    await access.flush_charges()
    assert (await _window(redis_client, KEY.key_id))["requests"] == 301


async def test_requests_a_replica_did_not_use_are_free_for_another_once_its_lease_ends(redis_client, clock):
    key = Principal(tenant_id="t", key_id="key_shared", requests_per_minute=100)
    first, second = _access(redis_client, clock), _access(redis_client, clock)
    assert await _admit_busily(first, clock, key, 20) == 20
    assert (await _window(redis_client, key.key_id))["requests"] > 20  # the first holds a lease
    clock.now += LEASE_SECONDS
    await first.flush_charges()
    assert await _admit_busily(second, clock, key, 90) == 80
    assert (await _window(redis_client, key.key_id))["requests"] == 100
    await first.close()
    await second.close()


async def test_a_lease_takes_at_most_a_quarter_of_what_is_left_in_the_window(redis_client, clock):
    key = Principal(tenant_id="t", key_id="key_quarter", requests_per_minute=100)
    first, second = _access(redis_client, clock), _access(redis_client, clock)
    assert await _admit_busily(first, clock, key, 20) == 20
    # The first replica's lease holds at most a quarter of the 80 left; the second gets the rest at once.
    assert await _admit_busily(second, clock, key, 100) >= 60
    await first.close()
    await second.close()


async def test_two_busy_replicas_admit_exactly_the_limit_between_them(redis_client, clock):
    key = Principal(tenant_id="t", key_id="key_pair", requests_per_minute=500)
    replicas = [_access(redis_client, clock), _access(redis_client, clock)]
    admitted = [0, 0]
    for _ in range(400):
        for i, replica in enumerate(replicas):
            admitted[i] += await _admit_busily(replica, clock, key, 1)
    assert sum(admitted) == 500 and min(admitted) > 100, admitted
    assert (await _window(redis_client, key.key_id))["requests"] == 500
    for replica in replicas:
        await replica.close()


async def test_requests_that_find_the_lease_used_up_together_wait_for_one_call(access, clock, redis_client):
    admitted = await _admit_busily(access, clock, KEY, 300)
    # Use the current lease up: Redis' count is then what was admitted.
    while (await _window(redis_client, KEY.key_id))["requests"] > admitted:
        admitted += await _admit_busily(access, clock, KEY, 1)
    before = await _script_calls(redis_client)
    await asyncio.gather(*(access.admit(KEY, 0) for _ in range(10)))
    assert await _script_calls(redis_client) - before == 1  # 10 when each asks Redis


async def test_leases_taken_at_the_same_time_keep_every_unused_request(access, clock, redis_client):
    # A new key's first lease is one request: the two requests waiting for it then each take a lease.
    await asyncio.gather(*(access.admit(KEY, 0) for _ in range(3)))
    assert (await _window(redis_client, KEY.key_id))["requests"] > 3
    clock.now += LEASE_SECONDS
    await access.flush_charges()
    assert (await _window(redis_client, KEY.key_id))["requests"] == 3


async def test_tokens_charged_here_ride_on_the_next_call_to_redis(access, redis_client):
    hold = await access.admit(KEY, 10)
    access.charge(KEY, 95, hold)
    # 95 charged here + 10 estimated would pass 100: the replica asks Redis, and the tokens go with it.
    with pytest.raises(ResourceExhausted, match="100 tokens per minute"):
        await access.admit(KEY, 10)
    assert (await _window(redis_client, KEY.key_id))["tokens"] == 95
    hold = await access.admit(KEY, 5)
    access.charge(KEY, 5, hold)
    with pytest.raises(ResourceExhausted):
        await access.admit(KEY, 0)
    assert (await _window(redis_client, KEY.key_id))["tokens"] == 100


async def test_tokens_flushed_while_a_lease_runs_still_count_in_its_check(access, clock, redis_client):
    assert await _admit_busily(access, clock, KEY, 50) == 50  # the key now admits from a lease
    access.charge(KEY, 95)
    await access.flush_charges()
    with pytest.raises(ResourceExhausted, match="100 tokens per minute"):
        await access.admit(KEY, 10)


async def test_tokens_of_keys_with_no_request_since_are_added_by_a_flush(access, redis_client):
    other = Principal(tenant_id="t", key_id="key_other", tokens_per_minute=1000)
    await access.admit(KEY, 1)
    await access.admit(other, 1)
    access.charge(KEY, 30)
    access.charge(other, 7)
    access.charge(other, 5)
    await access.flush_charges()
    assert (await _window(redis_client, KEY.key_id))["tokens"] == 30
    assert (await _window(redis_client, other.key_id))["tokens"] == 12
    await access.flush_charges()  # nothing owed: nothing added twice
    assert (await _window(redis_client, other.key_id))["tokens"] == 12
