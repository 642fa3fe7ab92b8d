"""The Cache facade the servicer calls: validates input, tries the layers in order, counts hits.

Only the exact layer exists so far; a lookup answers MISS or EXACT_HIT. Redis failures become
`Unavailable` quickly (short socket timeouts, at most one immediate reconnect) so that the Gateway can
bypass the cache instead of waiting on it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from redis.asyncio import Redis

from libs.config import CacheConfig
from libs.errors import InvalidArgument
from libs.redis_store import unavailable_when_redis_fails
from services.cache import keys
from services.cache.exact import ExactCache

log = logging.getLogger(__name__)

# Redis on the same network answers in about a millisecond; a call that takes longer than this means
# Redis is unwell, and the Gateway is better served by a quick UNAVAILABLE than by waiting.
REDIS_TIMEOUT_SECONDS = 1.0
MAX_NAME_CHARS = 256
INT32_MAX = 2**31 - 1


class LookupKind(enum.Enum):
    MISS = "miss"
    EXACT_HIT = "exact_hit"


@dataclass(frozen=True)
class LookupResult:
    kind: LookupKind
    response: bytes = b""


@dataclass(frozen=True)
class TenantStats:
    hits: int
    misses: int
    entries: int


def _require_name(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_NAME_CHARS} characters")


def _require_key(request_key: str) -> None:
    if not request_key:
        raise InvalidArgument("request_key", "must not be empty")


def resolve_ttl(ttl_seconds: int, default_seconds: int) -> int:
    if ttl_seconds < 0:
        raise InvalidArgument("ttl_seconds", "must not be negative (0 uses the configured default)")
    return ttl_seconds or default_seconds


class HitCounters:
    """Per-tenant lookup outcomes, counted in Redis so that every cache replica adds to the same totals."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def record(self, tenant_id: str, hit: bool) -> None:
        await self._redis.hincrby(keys.stats_key(tenant_id), "hits" if hit else "misses", 1)

    async def read(self, tenant_id: str) -> tuple[int, int]:
        hits, misses = await self._redis.hmget(keys.stats_key(tenant_id), ["hits", "misses"])
        return int(hits or 0), int(misses or 0)


class Cache:
    def __init__(self, redis: Redis, config: CacheConfig) -> None:
        self._redis = redis
        self._config = config
        self._exact = ExactCache(redis)
        self._counters = HitCounters(redis)

    async def close(self) -> None:
        await self._redis.aclose()

    async def lookup(self, tenant_id: str, model: str, request_key: str) -> LookupResult:
        _require_name("tenant_id", tenant_id)
        _require_name("model", model)
        _require_key(request_key)
        with unavailable_when_redis_fails("cache store"):
            response = await self._exact.get(tenant_id, model, request_key)
            await self._counters.record(tenant_id, hit=response is not None)
        if response is None:
            return LookupResult(LookupKind.MISS)
        return LookupResult(LookupKind.EXACT_HIT, response)

    async def store(
        self, tenant_id: str, model: str, request_key: str, response: bytes, ttl_seconds: int
    ) -> None:
        _require_name("tenant_id", tenant_id)
        _require_name("model", model)
        _require_key(request_key)
        if not response:
            raise InvalidArgument("response", "must not be empty")
        if len(response) > self._config.max_entry_bytes:
            raise InvalidArgument(
                "response",
                f"{len(response)} bytes exceeds the entry limit of {self._config.max_entry_bytes} bytes",
            )
        ttl = resolve_ttl(ttl_seconds, self._config.ttl_seconds)
        with unavailable_when_redis_fails("cache store"):
            await self._exact.put(tenant_id, model, request_key, response, ttl)

    async def invalidate(self, tenant_id: str, model: str) -> int:
        """Removes the tenant's entries of `model`, or of every model when `model` is empty."""
        _require_name("tenant_id", tenant_id)
        if len(model) > MAX_NAME_CHARS:
            raise InvalidArgument("model", f"must be at most {MAX_NAME_CHARS} characters")
        with unavailable_when_redis_fails("cache store"):
            removed = await self._exact.invalidate(tenant_id, model or None)
        return min(removed, INT32_MAX)

    async def stats(self, tenant_id: str) -> TenantStats:
        _require_name("tenant_id", tenant_id)
        with unavailable_when_redis_fails("cache store"):
            hits, misses = await self._counters.read(tenant_id)
            entries = await self._exact.count_entries(tenant_id)
        return TenantStats(hits=hits, misses=misses, entries=entries)
