"""Lookup counters: the counts of one turn of the event loop go to a real Redis in one write, none lost
or doubled, and a failed write fails every lookup that waits on it."""

import asyncio

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from libs.redis_store import open_redis
from services.cache import keys
from services.cache.counters import CoalescedCounters


async def _hincrby_calls(redis: Redis) -> int:
    return (await redis.info("commandstats")).get("cmdstat_hincrby", {}).get("calls", 0)


async def test_the_counts_of_one_turn_go_in_one_write(redis):
    counters = CoalescedCounters(redis)
    await asyncio.gather(
        *(counters.add("t", "misses") for _ in range(10)),
        counters.add("t", "hits_exact"),
        counters.add("u", "misses", "veto:number"),
    )
    # One increment per tenant and counter, not one per lookup.
    assert await _hincrby_calls(redis) == 4
    assert await redis.hgetall(keys.stats_key("t")) == {b"misses": b"10", b"hits_exact": b"1"}
    assert await redis.hgetall(keys.stats_key("u")) == {b"misses": b"1", b"veto:number": b"1"}


async def test_counts_added_after_a_write_began_go_in_the_next_one(redis):
    counters = CoalescedCounters(redis)
    await counters.add("t", "misses")
    await counters.add("t", "misses")
    assert await _hincrby_calls(redis) == 2
    assert await redis.hget(keys.stats_key("t"), "misses") == b"2"


async def test_a_lookup_that_goes_away_does_not_take_the_others_counts_with_it(redis):
    counters = CoalescedCounters(redis)
    leaving = asyncio.ensure_future(counters.add("t", "misses"))
    staying = counters.add("t", "misses")
    leaving.cancel()
    await staying
    assert await redis.hget(keys.stats_key("t"), "misses") == b"2"


async def test_a_failed_write_fails_every_lookup_waiting_on_it():
    unreachable = open_redis("redis://127.0.0.1:1/0", timeout_seconds=0.5, decode_responses=False)
    counters = CoalescedCounters(unreachable)
    outcomes = await asyncio.gather(
        counters.add("t", "misses"), counters.add("t", "hits_exact"), return_exceptions=True
    )
    assert all(isinstance(o, redis_errors.ConnectionError) for o in outcomes), outcomes
    await unreachable.aclose()
