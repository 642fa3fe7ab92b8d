"""The Gateway's plans from the Router's WatchRoutes snapshot: the Router's filters, and the Router asked
whenever a circuit is not closed, the snapshot is stale, or nothing is left."""

from __future__ import annotations

import time

from sophia.router.v1 import router_pb2 as pb

from libs.feature_flags import FeatureFlags
from services.gateway.domain import ChatRequest, Message
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
