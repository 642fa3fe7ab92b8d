"""CacheService over gRPC: translates requests for the `Cache` facade and its answers back."""

from __future__ import annotations

from sophia.cache.v1 import cache_pb2 as pb
from sophia.cache.v1 import cache_pb2_grpc

from services.cache.domain import Cache, LookupKind

RESULTS = {LookupKind.MISS: pb.CACHE_RESULT_MISS, LookupKind.EXACT_HIT: pb.CACHE_RESULT_EXACT_HIT}


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: Cache) -> None:
        self._cache = cache

    async def Lookup(self, request, context):
        result = await self._cache.lookup(request.tenant_id, request.model, request.request_key)
        return pb.LookupResponse(result=RESULTS[result.kind], response=result.response)

    async def Store(self, request, context):
        await self._cache.store(
            request.tenant_id, request.model, request.request_key, request.response, request.ttl_seconds
        )
        return pb.StoreResponse()

    async def Invalidate(self, request, context):
        removed = await self._cache.invalidate(request.tenant_id, request.model)
        return pb.InvalidateResponse(removed=removed)

    async def Stats(self, request, context):
        stats = await self._cache.stats(request.tenant_id)
        return pb.StatsResponse(hits=stats.hits, misses=stats.misses, entries=stats.entries)
