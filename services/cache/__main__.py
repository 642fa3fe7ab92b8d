"""python -m services.cache — the SemanticCache service (default port 50053)."""

from sophia.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.config import load_config_or_exit
from libs.redis_store import open_redis, wait_for_redis
from libs.server import run_service
from libs.tls import CallerPolicy, Identity
from services.cache.domain import REDIS_TIMEOUT_SECONDS, Cache
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
    cache = Cache(redis, config.cache)
    servicer = CacheServicer(cache)

    def register(server):
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
        return [cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name]

    async def start():
        await wait_for_redis(redis, config.redis.url)

    run_service("cache", config, register, start=start, stop=cache.close, callers=CALLERS)


if __name__ == "__main__":
    main()
