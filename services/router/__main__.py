"""python -m services.router — the Router service (default port 50052)."""

from __future__ import annotations

import asyncio

from sophia.router.v1 import router_pb2, router_pb2_grpc

from libs.config import load_config_or_exit
from libs.redis_store import open_redis
from libs.sentence_embeddings import EMBEDDING_MODEL_ID, load_embedding_model
from libs.server import run_service
from libs.tls import CallerPolicy, Identity
from services.router import metrics
from services.router.embedder import BoundedEmbedding, PromptEmbedder
from services.router.health import HealthBook, refresh_forever
from services.router.reloader import Reloader, build_state, repo_path
from services.router.router import Router, RoutingState
from services.router.servicer import RouterServicer

# Plans and outcomes belong to the Gateway's requests; operators may look and reload.
CALLERS = CallerPolicy(
    router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    {
        "Route": {Identity.GATEWAY},
        "ReportOutcome": {Identity.GATEWAY},
        "GetProviderHealth": {Identity.GATEWAY, Identity.OPERATOR},
        "ListModels": {Identity.GATEWAY, Identity.OPERATOR},
        "ReloadConfig": {Identity.GATEWAY, Identity.OPERATOR},
        "WatchRoutes": {Identity.GATEWAY},
    },
)
REDIS_TIMEOUT_SECONDS = 0.5


class RouterApp:
    """Wiring: the health book over Redis, the embedding model, the first state, the background tasks."""

    def __init__(self, config) -> None:
        self.config = config
        self.redis = open_redis(config.redis.url, timeout_seconds=REDIS_TIMEOUT_SECONDS)
        self.health = HealthBook(self.redis, config.routing.breaker)
        self.embedder: PromptEmbedder | None = None
        self.bounded: BoundedEmbedding | None = None
        self.router = Router(RoutingState(config, None), self.health, self.embed)
        self.reloader = Reloader(None, self.apply)
        self._tasks: list[asyncio.Task] = []
        metrics.observe_circuits(lambda: self.health)

    async def embed(self, prompt: str):
        return None if self.bounded is None else await self.bounded(prompt)

    def apply(self, state: RoutingState) -> None:
        self.router.state = state
        self.health.settings = state.config.routing.breaker
        # Reports are taken for configured targets only; those a reload dropped are forgotten.
        self.health.configure((m.provider, model_id) for model_id, m in state.config.models.items())
        if self.bounded is not None:
            self.bounded.timeout_seconds = state.config.routing.classifier.embed_timeout_seconds
            self.bounded.max_concurrent = state.config.routing.classifier.max_concurrent_embeddings

    def targets(self):
        return [
            (m.provider, model_id) for model_id, m in self.router.state.config.models.items() if m.enabled
        ]

    async def start(self) -> None:
        # Redis is not waited for: without it routing goes on with every breaker closed (health says
        # degraded), and the shared breakers are read as soon as it answers.
        model = await asyncio.to_thread(
            load_embedding_model, EMBEDDING_MODEL_ID, repo_path(self.config.inference.weights_dir), "cpu"
        )
        self.embedder = self.reloader.embedder = PromptEmbedder(model)
        settings = self.config.routing.classifier
        self.bounded = BoundedEmbedding(
            self.embedder, settings.embed_timeout_seconds, settings.max_concurrent_embeddings
        )
        self.apply(await asyncio.to_thread(build_state, self.config, self.embedder))
        await self.health.refresh(self.targets())
        self._tasks = [
            asyncio.create_task(refresh_forever(self.health, self.targets)),
            asyncio.create_task(self.reloader.watch_forever(self.config)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()


def main() -> None:
    config = load_config_or_exit()
    app = RouterApp(config)

    servicer = RouterServicer(app.router, app.health, app.reloader)

    def register(server):
        router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
        return [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name]

    run_service(
        "router", config, register, start=app.start, stop=app.stop, callers=CALLERS, draining=servicer.drain
    )


if __name__ == "__main__":
    main()
