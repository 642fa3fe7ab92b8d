"""Redis, the same way for every service: connect with short timeouts, wait for it at start-up, and
turn its failures into UNAVAILABLE (never an internal error, never a hang). A burst of commands waits for
a pooled connection rather than fail as if Redis were down. `redis_ping_probe` lets a
`libs.breaker.DependencyBreaker` tell when a Redis that went away is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from libs.breaker import Probe
from libs.errors import Unavailable

log = logging.getLogger(__name__)

READY_POLL_SECONDS = 0.5
# Connections per client (redis-py's default pool size).
MAX_CONNECTIONS = 100
WAITING_LOG_EVERY_SECONDS = 10.0


def open_redis(url: str, *, timeout_seconds: float, decode_responses: bool = True) -> Redis:
    # More commands at once than connections is this process' own load, not Redis failing: a command
    # waits for a free connection (at most one timeout) instead of failing at once as a pool that
    # raises MaxConnectionsError would, which callers would take for Redis being down.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_seconds,
        decode_responses=decode_responses,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        # One immediate retry on a broken connection covers pooled connections that died with a Redis
        # restart; timeouts are not retried, so a hung Redis costs one socket timeout, not several.
        retry=Retry(NoBackoff(), retries=1, supported_errors=(redis_errors.ConnectionError,)),
    )
    return Redis.from_pool(pool)


def redis_location(url: str) -> str:
    """host:port/db for logs: the URL may carry a password."""
    parsed = urllib.parse.urlparse(url)
    return f"{parsed.hostname}:{parsed.port or 6379}{parsed.path}"


async def wait_for_redis(client: Redis, url: str) -> None:
    """Returns once Redis answers PING; a service's health stays NOT_SERVING until then."""
    location, last_logged = redis_location(url), float("-inf")
    while True:
        try:
            await client.ping()
            log.info("redis at %s answers", location)
            return
        except redis_errors.RedisError as exc:
            if time.monotonic() - last_logged >= WAITING_LOG_EVERY_SECONDS:
                log.warning("waiting for redis at %s: %s", location, exc)
                last_logged = time.monotonic()
        await asyncio.sleep(READY_POLL_SECONDS)


ScriptCall = tuple[Sequence[str], Sequence[Any]]  # keys, args


async def run_script_calls(client: Redis, script: AsyncScript, calls: Sequence[ScriptCall]) -> list[Any]:
    """`script` once per (keys, args), in one pipeline: one round trip for the lot. A registered script
    called on a pipeline makes redis-py ask SCRIPT EXISTS before every execute, a second round trip per
    batch; here the script is loaded only when Redis answers NOSCRIPT (its first use, or after a Redis
    restart), and only the calls that got that answer are run again, so none runs twice. Results in the
    order of `calls`; the first error reply is raised, as `Pipeline.execute` does."""
    results = await _evalsha_pipeline(client, script.sha, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, redis_errors.NoScriptError)]
    if missing:
        await client.script_load(script.script)
        again = await _evalsha_pipeline(client, script.sha, [calls[i] for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


async def _evalsha_pipeline(client: Redis, sha: str, calls: Sequence[ScriptCall]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)


def redis_ping_probe(client: Redis) -> Probe:
    """A breaker probe: succeeds when Redis answers PING."""

    async def probe() -> None:
        await client.ping()

    return probe


@contextmanager
def unavailable_when_redis_fails(what: str) -> Iterator[None]:
    """Redis trouble inside the block becomes `Unavailable("<what> unavailable")`."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        raise Unavailable(f"{what} unavailable") from exc
    except redis_errors.RedisError as exc:
        log.error("redis refused a %s command: %s", what, exc)
        raise Unavailable(f"{what} unavailable") from exc
