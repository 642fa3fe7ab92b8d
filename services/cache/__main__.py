"""python -m services.cache — the SemanticCache service (default port 50053)."""

from sophia.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.config import load_config_or_exit
from libs.server import run_service
from services.cache.domain import Cache, open_redis, redis_location
from services.cache.servicer import CacheServicer


def main() -> None:
    config = load_config_or_exit()
    cache = Cache(open_redis(config.redis.url), config.cache)
    servicer = CacheServicer(cache)

    def register(server):
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
        return [cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name]

    async def start():
        await cache.wait_for_redis(redis_location(config.redis.url))

    run_service("cache", config, register, start=start, stop=cache.close)


if __name__ == "__main__":
    main()
