"""python -m services.cache — the SemanticCache service (default port 50053)."""

import asyncio

from sophia.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.config import load_config_or_exit
from libs.redis_store import open_redis, wait_for_redis
from libs.server import run_service
from libs.tls import CallerPolicy, Identity
from services.cache.domain import REDIS_TIMEOUT_SECONDS, Cache
from services.cache.embedder import build_cache
from services.cache.servicer import CacheServicer

# Only the Gateway reads and writes entries: a forged Store would be served to a tenant as a hit.
CALLERS = CallerPolicy(
    cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
    {
        "Lookup": {Identity.GATEWAY},
        "Store": {Identity.GATEWAY},
        "Invalidate": {Identity.GATEWAY, Identity.OPERATOR},
        "Stats": {Identity.GATEWAY, Identity.OPERATOR},
    },
)


def main() -> None:
    config = load_config_or_exit()
    # Cached responses are bytes, so the client keeps them undecoded.
    redis = open_redis(config.redis.url, timeout_seconds=REDIS_TIMEOUT_SECONDS, decode_responses=False)
    servicer = CacheServicer()
    running: list[Cache] = []

    def register(server):
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
        return [cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name]

    async def start():
        # NOT_SERVING until the model is loaded, Redis answers and the index is rebuilt from it.
        cache = await asyncio.to_thread(build_cache, redis, config.cache, config.inference.weights_dir)
        running.append(cache)
        await wait_for_redis(redis, config.redis.url)
        await cache.start()
        servicer.attach(cache)

    async def stop():
        for cache in running:
            await cache.close()
        if not running:
            await redis.aclose()

    run_service("cache", config, register, start=start, stop=stop, callers=CALLERS)


if __name__ == "__main__":
    main()
