"""The exact layer: a response stored under a digest of (tenant, model, request key), with a TTL."""

from __future__ import annotations

from redis.asyncio import Redis

from services.cache import keys

# Keys asked per SCAN step: large enough to walk a namespace in few round trips, small enough that no
# single step holds Redis (which serves the rate limiter too) for long.
SCAN_BATCH = 500


class ExactCache:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def get(self, tenant_id: str, model: str, request_key: str) -> bytes | None:
        return await self._redis.get(keys.exact_key(tenant_id, model, request_key))

    async def put(
        self, tenant_id: str, model: str, request_key: str, response: bytes, ttl_seconds: int
    ) -> None:
        await self._redis.set(keys.exact_key(tenant_id, model, request_key), response, ex=ttl_seconds)

    async def invalidate(self, tenant_id: str, model: str | None) -> int:
        """Deletes the tenant's entries (of one model, or of all when model is None); returns how many."""
        removed = 0
        batch: list[bytes] = []
        async for key in self._redis.scan_iter(match=keys.exact_pattern(tenant_id, model), count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                removed += await self._redis.unlink(*batch)
                batch.clear()
        if batch:
            removed += await self._redis.unlink(*batch)
        # UNLINK counts only keys that still existed, so keys SCAN returned twice or that expired
        # meanwhile are not counted.
        return removed

    async def count_entries(self, tenant_id: str) -> int:
        """Live entries of the tenant (SCAN skips expired keys); a set because SCAN may repeat a key."""
        seen = {
            key async for key in self._redis.scan_iter(match=keys.exact_pattern(tenant_id), count=SCAN_BATCH)
        }
        return len(seen)
