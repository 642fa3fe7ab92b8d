"""Assembles the Gateway: provider adapters, clients of the other services, the chat flow, the servicer.

Everything that opens a gRPC channel is built in `open()`, inside the server's event loop, because
grpc.aio channels belong to the loop they were made in.
"""

from __future__ import annotations

import logging

import grpc
from sophia.cache.v1 import cache_pb2_grpc
from sophia.ledger.v1 import ledger_pb2_grpc
from sophia.router.v1 import router_pb2_grpc

from libs.background import Background
from libs.clients import open_channel
from libs.config import REPO_ROOT, Config
from libs.feature_flags import FeatureFlags
from libs.pricing import PriceTable
from libs.redis_store import open_redis
from services.gateway.access.admission import Admission
from services.gateway.access.api_keys import KeyRing
from services.gateway.access.audit import AuditLog
from services.gateway.access.control import AccessControl
from services.gateway.api.admin_servicer import AdminServicer
from services.gateway.api.gateway_servicer import GatewayServicer
from services.gateway.api.insight_servicer import InsightServicer
from services.gateway.providers.registry import build_providers
from services.gateway.serving.idempotency import IdempotencyKeys
from services.gateway.serving.request_flow import RequestFlow
from services.gateway.serving.router_client import Routing
from services.gateway.usage.journal import UsageJournal
from services.gateway.usage.prices import LedgerPrices
from services.gateway.usage.recorder import UsageRecorder, ledger_breaker

log = logging.getLogger(__name__)

# After the server has drained, usage records and cache stores still on their way get this long.
BACKGROUND_DRAIN_SECONDS = 10.0


class GatewayApp:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = KeyRing(config.auth)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self) -> GatewayServicer:
        config = self.config
        self.providers = build_providers(config)
        # The Gateway's own features (semantic caching per tenant) and the tenants' model flags for
        # snapshot-planned routes follow the same flag file as the Router.
        flags_file = config.routing.flags_file
        tiers = {tenant: tenant_config.tier for tenant, tenant_config in config.auth.tenants.items()}
        self.flags = FeatureFlags(REPO_ROOT / flags_file if flags_file else None, tiers)
        self.routing = Routing(config, self.flags)
        self._channels = {
            "cache": open_channel(
                config.services.cache.address,
                service="sophia.cache.v1.CacheService",
                idempotent_methods=("Lookup", "Stats"),
                settings=config.clients,
            ),
            "ledger": open_channel(
                config.services.ledger.address,
                service="sophia.ledger.v1.LedgerService",
                # RecordUsage is idempotent by request id, so it is safe to retry too.
                idempotent_methods=(
                    "RecordUsage",
                    "CheckBudget",
                    "GetUsageReport",
                    "ListPrices",
                    "GetRecommendations",
                ),
                settings=config.clients,
            ),
            # InsightService's reads of the Router (provider health), apart from the routing path's channel.
            "router": open_channel(
                config.services.router.address,
                service="sophia.router.v1.RouterService",
                idempotent_methods=("GetProviderHealth",),
                settings=config.clients,
            ),
        }
        self.background = Background()
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channels["ledger"])
        self.cache = cache_pb2_grpc.CacheServiceStub(self._channels["cache"])
        self.prices = LedgerPrices(self.ledger, PriceTable(config.ledger.prices))
        self.admission = Admission(
            max_inflight=config.gateway.max_inflight_requests,
            max_tenant_share=config.gateway.max_tenant_share,
            retry_after_ms=config.gateway.overload_retry_after_ms,
        )
        self.usage = UsageRecorder(
            self.ledger,
            UsageJournal(REPO_ROOT / config.gateway.outbox_dir, in_flight=lambda: self.admission.inflight),
            config.gateway.outbox_replay_seconds,
            ledger_breaker(self._channels["ledger"]),
        )
        # API keys and rate-limit counters, shared with the other Gateway replicas.
        self.redis = open_redis(config.redis.url, timeout_seconds=config.gateway.redis_timeout_seconds)
        self.access = AccessControl.over_redis(
            self.keys, self.redis, key_cache_seconds=config.gateway.key_cache_seconds
        )
        self.flow = RequestFlow.build(
            config,
            self.access,
            self.routing,
            self.providers,
            self._channels,
            self.usage,
            self.background,
            IdempotencyKeys(self.redis, config.gateway.idempotency_window_seconds),
            self.prices,
            self.flags,
        )
        return GatewayServicer(config, self.access, self.routing, self.flow, self.admission)

    def admin(self) -> AdminServicer:
        """AdminService, on the channels `open()` made (call it after `open()`)."""
        return AdminServicer(
            self.access,
            AuditLog(self.redis, self.config.auth.audit),
            self.ledger,
            self.cache,
            router_pb2_grpc.RouterServiceStub(self._channels["router"]),
            self.flags,
            self.config.auth.default_rotation_grace_seconds,
        )

    def insight(self) -> InsightServicer:
        """InsightService, on the channels `open()` made (call it after `open()`)."""
        return InsightServicer(
            self.access,
            self.routing,
            self.ledger,
            self.cache,
            router_pb2_grpc.RouterServiceStub(self._channels["router"]),
        )

    async def start(self) -> None:
        """Takes up usage an earlier run left unacknowledged in the journal, and replays from now on;
        mirrors the ledger's prices."""
        await self.usage.start()
        self.prices.start()
        self.access.start()
        self.flags.start_watching()
        self.routing.snapshots.start()

    async def close(self) -> None:
        await self.background.drain(BACKGROUND_DRAIN_SECONDS)
        # Unacknowledged records stay in the journal for the next start.
        await self.usage.close(BACKGROUND_DRAIN_SECONDS)
        await self.flow.close()
        await self.prices.close()
        await self.flags.aclose()
        await self.access.close()
        await self.routing.close()
        for provider in self.providers.values():
            await provider.close()
        for channel in self._channels.values():
            await channel.close()
        # After the background drain, which may still charge tokens.
        await self.redis.aclose()
