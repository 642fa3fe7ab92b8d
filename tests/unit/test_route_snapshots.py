"""The Gateway's plans from the Router's WatchRoutes snapshot: the Router's filters, and the Router asked
whenever a circuit is not closed, the snapshot is stale, or nothing is left."""

from __future__ import annotations

import asyncio
import time

from sophia.router.v1 import router_pb2 as pb

from libs.feature_flags import FeatureFlags
from services.gateway.domain import ChatRequest, Message
from services.gateway.serving import router_client
from services.gateway.serving.router_client import RouteSnapshots


def traits(model_id: str, *, window=8192, state=pb.CIRCUIT_STATE_CLOSED, tools=False, enabled=True):
    return pb.TargetTraits(
        target=pb.RouteTarget(model_id=model_id, provider=f"p-{model_id}", provider_model=model_id),
        context_window=window,
        enabled=enabled,
        refuses_tools=tools,
        circuit_state=state,
    )


def snapshots(*targets: pb.TargetTraits) -> RouteSnapshots:
    watcher = RouteSnapshots(stub=None, flags=FeatureFlags(None))
    chain = pb.ExplicitChain(model_id="big", chain=["big", "small"])
    watcher._take(pb.WatchRoutesResponse(chains=[chain], targets=targets))
    return watcher


def ask(**options) -> ChatRequest:
    return ChatRequest(model="big", messages=(Message("user", "hi"),), **options)


def test_all_closed_plans_the_chain_without_the_router():
    plan = snapshots(traits("big"), traits("small")).plan(ask(), "t", 100)
    assert [t.model_id for t in plan.targets] == ["big", "small"]
    assert plan.reason == "explicit model big"


def test_the_routers_filters_apply_and_are_named():
    watcher = snapshots(traits("big", window=50, tools=True), traits("small"))
    plan = watcher.plan(ask(tools=({"type": "function"},)), "t", 100)
    assert [t.model_id for t in plan.targets] == ["small"]
    assert "skipped big (context window 50 < 100 tokens)" in plan.reason


def test_a_circuit_not_closed_is_the_routers_decision():
    for state in (pb.CIRCUIT_STATE_OPEN, pb.CIRCUIT_STATE_HALF_OPEN):
        assert snapshots(traits("big"), traits("small", state=state)).plan(ask(), "t", 100) is None


def test_nothing_left_unknown_model_or_stale_snapshot_ask_the_router():
    assert snapshots(traits("big", enabled=False), traits("small", enabled=False)).plan(ask(), "t", 1) is None
    assert snapshots(traits("big")).plan(ask(), "t", 1) is None  # "small" unknown to the snapshot
    watcher = snapshots(traits("big"), traits("small"))
    watcher._fresh_until = time.monotonic() - 1
    assert watcher.plan(ask(), "t", 1) is None
    assert watcher.plan(ChatRequest(model="other", messages=(Message("user", "x"),)), "t", 1) is None


class FlakyRouter:
    """WatchRoutes that ends at once, then fails with an error of no gRPC kind, then sends a snapshot."""

    def __init__(self) -> None:
        self.opened = 0

    async def _streams(self):
        self.opened += 1
        if self.opened == 2:
            raise ValueError("a snapshot this Gateway cannot read")
        if self.opened == 3:
            chain = pb.ExplicitChain(model_id="big", chain=["big"])
            yield pb.WatchRoutesResponse(chains=[chain], targets=[traits("big")])
            await asyncio.sleep(3600)

    def WatchRoutes(self, request):
        return self._streams()


async def test_the_watch_outlives_a_failed_stream_and_does_not_reopen_in_a_tight_loop(monkeypatch):
    monkeypatch.setattr(router_client, "SNAPSHOT_RETRY_SECONDS", 0.05)
    router = FlakyRouter()
    watcher = RouteSnapshots(stub=router, flags=FeatureFlags(None))
    started = time.monotonic()
    watcher.start()
    for _ in range(100):
        if watcher.plan(ask(), "t", 1) is not None:
            break
        await asyncio.sleep(0.01)
    watcher._task.cancel()
    assert [t.model_id for t in watcher.plan(ask(), "t", 1).targets] == ["big"]
    assert router.opened == 3
    assert time.monotonic() - started >= 2 * 0.05  # the empty and the failed stream each waited
