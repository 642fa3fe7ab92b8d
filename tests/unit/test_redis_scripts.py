"""run_script_calls against a real Redis: one round trip per batch (no SCRIPT EXISTS), the script loaded
when Redis does not know it, and no call run twice."""

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from libs.redis_store import run_script_calls

# Appends its argument to a list and returns the list's new length: a call run twice shows.
APPEND = "return redis.call('RPUSH', KEYS[1], ARGV[1])"
FAIL_ON_BAD = "if ARGV[1] == 'bad' then return redis.error_reply('bad argument') end return ARGV[1]"


async def _calls(redis: Redis, command: str) -> int:
    return (await redis.info("commandstats")).get(f"cmdstat_{command}", {}).get("calls", 0)


async def test_a_batch_is_one_evalsha_per_call_and_no_script_exists(redis_client):
    script = redis_client.register_script(APPEND)
    await redis_client.script_load(APPEND)
    results = await run_script_calls(redis_client, script, [(["l"], ["a"]), (["l"], ["b"]), (["m"], ["c"])])
    assert results == [1, 2, 1]
    assert await redis_client.lrange("l", 0, -1) == ["a", "b"]
    assert await _calls(redis_client, "evalsha") == 3
    assert await _calls(redis_client, "script|exists") == 0


async def test_an_unknown_script_is_loaded_and_each_call_runs_once(redis_client):
    script = redis_client.register_script(APPEND)
    assert await run_script_calls(redis_client, script, [(["l"], ["a"]), (["l"], ["b"])]) == [1, 2]
    await redis_client.script_flush()  # as after a Redis restart
    assert await run_script_calls(redis_client, script, [(["l"], ["c"])]) == [3]
    assert await redis_client.lrange("l", 0, -1) == ["a", "b", "c"]


async def test_an_error_reply_is_raised_after_the_other_calls_ran(redis_client):
    script = redis_client.register_script(FAIL_ON_BAD)
    with pytest.raises(redis_errors.ResponseError, match="bad argument"):
        await run_script_calls(redis_client, script, [([], ["good"]), ([], ["bad"])])
