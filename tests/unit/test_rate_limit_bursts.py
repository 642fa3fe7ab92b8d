"""The rate limiter under bursts, failures and a Redis that lost its data, against a real Redis: a replica
makes one call to Redis per key at a time (a burst neither takes every connection, which opened the
breaker and switched limits off for every key, nor gets refusals its lease could have admitted), a burst
over many keys waits for a connection, given-back requests never make a window Redis lost or take a count
below zero, and tokens owed survive a call that failed or was cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from libs.breaker import BreakerState
from libs.config import AuthConfig
from libs.errors import ResourceExhausted
from libs.redis_store import open_redis
from services.gateway.access.api_keys import KeyRing
from services.gateway.access.control import AccessControl, redis_breaker
from services.gateway.access.key_store import KeyStore
from services.gateway.access.rate_limits import LEASE_SECONDS, RateLimiter
from services.gateway.domain import Principal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptCalls:
    """Stands in front of a limiter's admit script (Redis still runs it): counts the calls, and the most
    under way at once."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._script = limiter._admit_script
        limiter._admit_script = self
        self.calls = self.under_way = self.most_at_once = 0

    async def __call__(self, **kwargs):
        self.calls += 1
        self.under_way += 1
        self.most_at_once = max(self.most_at_once, self.under_way)
        try:
            return await self._script(**kwargs)
        finally:
            self.under_way -= 1


class Replica:
    """One Gateway replica's access control, its limiter's leases on `clock`."""

    def __init__(self, client: Redis, clock: Clock) -> None:
        self.limiter = RateLimiter(client, clock)
        self.access = AccessControl(
            KeyRing(AuthConfig()),
            KeyStore(client),
            self.limiter,
            key_cache_seconds=1,
            breaker=redis_breaker(client),
        )

    async def admitted(self, key: Principal, estimated_tokens: int = 0) -> bool:
        try:
            await self.access.admit(key, estimated_tokens)
            return True
        except ResourceExhausted:
            return False

    async def burst(self, key: Principal, count: int) -> int:
        """`count` requests at once; how many were admitted."""
        return sum(await asyncio.gather(*(self.admitted(key) for _ in range(count))))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def replica(redis_client, clock):
    replica = Replica(redis_client, clock)
    yield replica
    await replica.access.close()


def _port(client: Redis) -> int:
    return client.connection_pool.connection_kwargs["port"]


async def _in_one_window(client: Redis) -> None:
    """Waits out the last seconds of Redis' minute, so that what a test counts falls in one window."""
    seconds, _ = await client.time()
    if seconds % 60 >= 55:
        await asyncio.sleep(60 - seconds % 60 + 0.1)


async def _windows(client: Redis, key_id: str) -> dict[str, tuple[dict[str, int], int]]:
    """The key's windows: counters and seconds to live (-1: none)."""
    return {
        window: (
            {field: int(value) for field, value in (await client.hgetall(window)).items()},
            await client.ttl(window),
        )
        async for window in client.scan_iter(f"gateway:ratelimit:{{{key_id}}}:*")
    }


async def test_a_burst_on_one_key_asks_redis_one_call_at_a_time(replica):
    key = Principal(tenant_id="t", key_id="key_burst", requests_per_minute=1_000_000)
    script = ScriptCalls(replica.limiter)
    assert await replica.burst(key, 200) == 200
    # Before: the first call, then every request its one-request lease could not hold asked Redis too.
    assert script.most_at_once == 1 and script.calls <= 3, (script.most_at_once, script.calls)
    assert replica.access._breaker.state is BreakerState.CLOSED


async def test_a_burst_on_one_key_does_not_switch_limits_off_for_every_key(replica, redis_client):
    noisy = Principal(tenant_id="noisy", key_id="key_noisy", requests_per_minute=1_000_000)
    other = Principal(tenant_id="other", key_id="key_other", requests_per_minute=5)
    await _in_one_window(redis_client)
    # More requests at once than the client has connections: they took them all, the pool's error looked
    # like Redis being down, and three of those opened the breaker.
    assert await replica.burst(noisy, 150) == 150
    assert [await replica.admitted(other) for _ in range(10)] == [True] * 5 + [False] * 5


async def test_a_burst_over_many_keys_waits_for_connections_instead_of_failing_open(redis_client, clock):
    client = open_redis(f"redis://127.0.0.1:{_port(redis_client)}/0", timeout_seconds=2)
    replica = Replica(client, clock)
    keys = [Principal(tenant_id="t", key_id=f"key_{i}", requests_per_minute=1) for i in range(300)]
    await _in_one_window(redis_client)
    assert sum(await asyncio.gather(*(replica.admitted(key) for key in keys))) == 300
    assert sum(await asyncio.gather(*(replica.admitted(key) for key in keys))) == 0
    assert replica.access._breaker.state is BreakerState.CLOSED
    await replica.access.close()
    await client.aclose()


async def test_a_burst_on_a_fresh_key_is_admitted_not_refused_while_its_lease_has_room(
    replica, redis_client, clock
):
    key = Principal(tenant_id="t", key_id="key_fresh", requests_per_minute=600)
    await _in_one_window(redis_client)
    # Before: the requests the first lease could not hold each took a lease, until Redis' count reached
    # the limit and refused the rest, while this replica sat on hundreds of unused requests.
    assert await replica.burst(key, 80) == 80
    clock.now += LEASE_SECONDS
    await replica.access.flush_charges()
    [(counts, _)] = (await _windows(redis_client, key.key_id)).values()
    assert counts["requests"] == 80


async def test_a_burst_over_the_request_limit_costs_one_call_to_redis(replica, redis_client):
    key = Principal(tenant_id="t", key_id="key_full", requests_per_minute=5)
    await _in_one_window(redis_client)
    assert await replica.burst(key, 5) == 5
    script = ScriptCalls(replica.limiter)
    assert await replica.burst(key, 50) == 0
    assert script.calls == 1


async def test_a_burst_over_the_token_limit_costs_one_call_to_redis(replica, redis_client):
    key = Principal(tenant_id="t", key_id="key_tokens_full", requests_per_minute=1000, tokens_per_minute=1000)
    await _in_one_window(redis_client)
    running = await replica.access.admit(key, 900)  # 900 tokens running: no room for 500 more
    script = ScriptCalls(replica.limiter)
    admitted = await asyncio.gather(*(replica.admitted(key, 500) for _ in range(50)))
    assert (sum(admitted), script.calls) == (0, 1)
    running.end()


async def test_a_lease_given_back_after_redis_lost_its_window_does_not_make_room(redis_client, clock):
    first, second = Replica(redis_client, clock), Replica(redis_client, clock)
    key = Principal(tenant_id="t", key_id="key_restart", requests_per_minute=1000)
    await _in_one_window(redis_client)
    assert await first.burst(key, 20) == 20
    assert first.limiter._leases[key.key_id].unused > 0
    await redis_client.flushall()  # a Redis restart without persistence, or a failover to a lagging replica
    clock.now += LEASE_SECONDS
    await first.access.flush_charges()  # gives the lease's unused requests back
    # Before: a window of -unused requests, with no expiry, so the limit admitted that many more.
    assert await _windows(redis_client, key.key_id) == {}
    admitted = 0
    for _ in range(1100):
        clock.now += 0.0001
        admitted += await second.admitted(key)
    assert admitted == 1000
    for replica in (first, second):
        await replica.access.close()


async def test_requests_given_back_never_take_a_window_below_zero(redis_client, clock):
    first, second = Replica(redis_client, clock), Replica(redis_client, clock)
    key = Principal(tenant_id="t", key_id="key_negative", requests_per_minute=1000)
    await _in_one_window(redis_client)
    assert await first.burst(key, 20) == 20
    await redis_client.flushall()
    assert await second.admitted(key)  # a new window, younger than the first replica's lease
    clock.now += LEASE_SECONDS
    await first.access.flush_charges()
    [(counts, ttl)] = (await _windows(redis_client, key.key_id)).values()
    assert counts["requests"] == 0 and ttl > 0
    for replica in (first, second):
        await replica.access.close()


@pytest.mark.parametrize("ending", ["cancelled", "timed out"])
async def test_tokens_owed_are_kept_when_the_call_carrying_them_does_not_complete(
    redis_client, clock, ending
):
    client = open_redis(f"redis://127.0.0.1:{_port(redis_client)}/0", timeout_seconds=0.1)
    replica = Replica(client, clock)
    key = Principal(tenant_id="t", key_id="key_owed", requests_per_minute=1000, tokens_per_minute=100_000)
    await _in_one_window(redis_client)
    assert await replica.admitted(key)  # the key's lease: one request, used
    replica.access.charge(key, 5000)
    async with Redis(port=_port(redis_client)) as admin:
        await admin.execute_command("CLIENT", "PAUSE", "400", "ALL")  # Redis answers nothing for 400 ms
    call = asyncio.create_task(replica.admitted(key))  # asks Redis, the 5000 tokens riding along
    if ending == "cancelled":
        await asyncio.sleep(0.05)
        call.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await call
    else:
        assert await call  # after the timeout: limits fail open
    await asyncio.sleep(0.5)
    await replica.access.flush_charges()
    [(counts, _)] = (await _windows(redis_client, key.key_id)).values()
    assert counts.get("tokens", 0) >= 5000  # before: dropped with the call
    await replica.access.close()
    await client.aclose()


async def _burst_while_redis_pauses(redis_client, clock, key: Principal, pause_ms: int) -> ScriptCalls:
    """20 requests at once on a replica whose Redis calls time out after 300 ms, Redis answering nothing
    for `pause_ms`: all are admitted (counted, or let through as limits fail open), two timeouts at most."""
    client = open_redis(f"redis://127.0.0.1:{_port(redis_client)}/0", timeout_seconds=0.3)
    replica = Replica(client, clock)
    script = ScriptCalls(replica.limiter)
    await _in_one_window(redis_client)
    async with Redis(port=_port(redis_client)) as admin:
        await admin.execute_command("CLIENT", "PAUSE", str(pause_ms), "ALL")
    started = time.monotonic()
    assert await replica.burst(key, 20) == 20
    assert time.monotonic() - started < 1.0  # not a timeout per waiter, one after another
    await asyncio.sleep(max(0.0, started + pause_ms / 1000 - time.monotonic()) + 0.05)
    await replica.access.close()
    await client.aclose()
    return script


async def test_the_requests_waiting_for_a_call_that_failed_try_once_more_on_one_call(redis_client, clock):
    key = Principal(tenant_id="t", key_id="key_slow", requests_per_minute=1000)
    script = await _burst_while_redis_pauses(redis_client, clock, key, pause_ms=450)
    # Before: each waiter asked Redis itself once the first call failed.
    assert (script.calls, script.most_at_once) == (2, 1)
    [(counts, _)] = (await _windows(redis_client, key.key_id)).values()
    assert counts["requests"] >= 19  # the second call counted the waiters


async def test_the_requests_waiting_for_a_hung_redis_fail_with_the_second_call(redis_client, clock):
    key = Principal(tenant_id="t", key_id="key_hung", requests_per_minute=1000)
    script = await _burst_while_redis_pauses(redis_client, clock, key, pause_ms=1500)
    assert (script.calls, script.most_at_once) == (2, 1)


async def test_requests_arriving_together_cannot_all_pass_the_token_check(replica, redis_client):
    """Tokens are charged when a request ends: before, every request of a burst passed the check while
    nothing had been charged yet. Now a running request's estimate counts until its charge."""
    await _in_one_window(redis_client)
    key = Principal(tenant_id="t", key_id="key_tokens", requests_per_minute=1000, tokens_per_minute=1000)

    async def attempt():
        try:
            return await replica.access.admit(key, 600)
        except ResourceExhausted:
            return None

    holds = [hold for hold in await asyncio.gather(*(attempt() for _ in range(5))) if hold is not None]
    assert len(holds) == 1  # 600 running + 600 more would pass 1000
    assert await replica.admitted(key, 0)  # a request that uses no tokens still runs
    assert not await replica.admitted(key, 600)
    holds[0].end()  # the running request failed: its estimate no longer counts
    assert await replica.admitted(key, 600)


async def test_a_charge_ends_the_hold_and_counts_what_was_used_instead(replica, redis_client):
    await _in_one_window(redis_client)
    key = Principal(tenant_id="t", key_id="key_charged", requests_per_minute=1000, tokens_per_minute=1000)
    hold = await replica.access.admit(key, 900)
    assert not await replica.admitted(key, 200)  # 900 running
    replica.access.charge(key, 100, hold)
    assert await replica.admitted(key, 200)  # 100 used + 200: within 1000
