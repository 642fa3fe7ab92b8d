"""CacheService over gRPC: translates requests for the `Cache` facade and its answers back."""

from __future__ import annotations

from sophia.cache.v1 import cache_pb2 as pb
from sophia.cache.v1 import cache_pb2_grpc

from libs.errors import InvalidArgument, Unavailable
from services.cache.domain import Cache, Layer, LookupQuery, StoreCommand
from services.cache.guards import Veto
from services.cache.semantic import AnswerEnd

LAYERS = {Layer.EXACT: pb.CACHE_LAYER_EXACT, Layer.SEMANTIC: pb.CACHE_LAYER_SEMANTIC}
VETOES = {veto: pb.VetoReason.Value(f"VETO_REASON_{veto.name}") for veto in Veto}
ANSWER_ENDS = {
    pb.ANSWER_END_UNSPECIFIED: AnswerEnd.COMPLETE,
    pb.ANSWER_END_COMPLETE: AnswerEnd.COMPLETE,
    pb.ANSWER_END_TRUNCATED: AnswerEnd.TRUNCATED,
    pb.ANSWER_END_REFUSAL: AnswerEnd.REFUSAL,
}


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Serves once `attach` gave it the cache (the embedding model and the index load after the port is
    bound, while health says NOT_SERVING)."""

    def __init__(self, cache: Cache | None = None) -> None:
        self._ready = cache

    def attach(self, cache: Cache) -> None:
        self._ready = cache

    @property
    def _cache(self) -> Cache:
        if self._ready is None:
            raise Unavailable("the cache is starting (loading its model and index)")
        return self._ready

    async def Lookup(self, request, context):
        result = await self._cache.lookup(
            LookupQuery(
                tenant_id=request.tenant_id,
                model=request.model,
                scope=request.scope,
                question=request.question,
                semantic=request.semantic,
                embedding=tuple(request.embedding),
            )
        )
        return pb.LookupResponse(
            result=pb.CACHE_RESULT_HIT if result.layer else pb.CACHE_RESULT_MISS,
            layer=LAYERS.get(result.layer, pb.CACHE_LAYER_UNSPECIFIED),
            response=result.response,
            similarity=result.similarity,
            embedding=result.embedding.tolist() if result.embedding is not None else [],
            veto=VETOES.get(result.veto, pb.VETO_REASON_UNSPECIFIED),
        )

    async def Store(self, request, context):
        if request.answer_end not in ANSWER_ENDS:
            raise InvalidArgument("answer_end", f"unknown value {request.answer_end}")
        evicted = await self._cache.store(
            StoreCommand(
                tenant_id=request.tenant_id,
                model=request.model,
                scope=request.scope,
                question=request.question,
                response=request.response,
                ttl_seconds=request.ttl_seconds,
                semantic=request.semantic,
                embedding=tuple(request.embedding),
                answer_end=ANSWER_ENDS[request.answer_end],
            )
        )
        return pb.StoreResponse(evicted=evicted)

    async def Invalidate(self, request, context):
        removed = await self._cache.invalidate(request.tenant_id, request.model)
        return pb.InvalidateResponse(removed=removed)

    async def Stats(self, request, context):
        stats = await self._cache.stats(request.tenant_id)
        return pb.StatsResponse(
            hits=stats.hits,
            misses=stats.misses,
            entries=stats.entries,
            exact_hits=stats.exact_hits,
            semantic_hits=stats.semantic_hits,
            vetoes=[pb.VetoCount(reason=VETOES[veto], count=count) for veto, count in stats.vetoes.items()],
            indexed_entries=stats.indexed_entries,
        )
