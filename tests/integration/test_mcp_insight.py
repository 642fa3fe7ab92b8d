"""The Gateway RPCs the MCP tools stand on, over REST through the edge and over gRPC: InsightService (a
tenant's own key) and the AdminService additions (recommendations, cache invalidation)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from sophia.gateway.v1 import gateway_pb2, insight_pb2, insight_pb2_grpc

from tests.integration.conftest import ADMIN_KEY, DEV_KEY

pytestmark = pytest.mark.integration

TENANT = {"Authorization": f"Bearer {DEV_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def edge(mesh):
    with httpx.Client(base_url=mesh.edge_url, timeout=60) as client:
        yield client


def test_the_caller_behind_a_key(edge) -> None:
    assert edge.get("/v1/insight/caller", headers=TENANT).json() == {
        "role": "CALLER_ROLE_TENANT",
        "tenant_id": "dev",
        "key_id": "cfg-dev-dev",
    }
    assert edge.get("/v1/insight/caller", headers=ADMIN).json() == {
        "role": "CALLER_ROLE_ADMIN",
        "key_id": "cfg-admin",
    }
    refused = edge.get("/v1/insight/caller", headers={"Authorization": "Bearer sk-sophia-nope"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "UNAUTHENTICATED")


def test_tenant_usage_takes_rfc3339_bounds_in_the_query(edge) -> None:
    empty = edge.get(
        "/v1/insight/usage",
        params={"start_time": "2020-01-01T00:00:00Z", "end_time": "2020-02-01T00:00:00Z", "group_by": "day"},
        headers=TENANT,
    )
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"tenant_id": "dev", "total": {"key": "total", "requests": 0, "input_tokens": 0,
                                                          "output_tokens": 0, "cost_usd": 0}}  # fmt: skip
    backwards = edge.get(
        "/v1/insight/usage",
        params={"start_time": "2020-02-01T00:00:00Z", "end_time": "2020-01-01T00:00:00Z"},
        headers=TENANT,
    )
    assert backwards.status_code == 400
    assert backwards.json()["error"]["message"] == "start_time: must be before end_time"
    bad_group = edge.get("/v1/insight/usage", params={"group_by": "week"}, headers=TENANT)
    assert (bad_group.status_code, bad_group.json()["error"]["param"]) == (400, "group_by")


def test_the_read_only_insights_answer_a_tenant_key(edge) -> None:
    for path in ("/v1/insight/recommendations", "/v1/insight/providers", "/v1/insight/cache"):
        reply = edge.get(path, headers=TENANT)
        assert reply.status_code == 200, (path, reply.text)
    assert edge.get("/v1/insight/recommendations", headers=TENANT).json()["projection"]["month"]
    stats = edge.get("/v1/insight/cache", headers=TENANT).json()
    assert stats["tenant_id"] == "dev" and {"hits", "misses", "entries", "hit_rate"} <= stats.keys()
    # A tenant's key is no admin key.
    assert edge.get("/admin/v1/tenants/dev/recommendations", headers=TENANT).status_code in (401, 403)


def test_admin_recommendations_and_cache_invalidation(edge) -> None:
    advice = edge.get("/admin/v1/tenants/dev/recommendations", headers=ADMIN)
    assert advice.status_code == 200, advice.text
    assert advice.json()["tenant_id"] == "dev" and "window_start" in advice.json()
    removed = edge.delete(
        "/admin/v1/tenants/dev/cache", params={"model": "smollm2-135m-instruct"}, headers=ADMIN
    )
    assert removed.status_code == 200, removed.text
    assert removed.json()["removed"] >= 0
    bad = edge.delete("/admin/v1/tenants/no%20such/cache", headers=ADMIN)
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "tenant_id")


async def test_explain_route_over_grpc_names_the_plan_without_calling_a_model(mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        insight = insight_pb2_grpc.InsightServiceStub(channel)
        params = gateway_pb2.ChatCompletionParams(
            model="auto", messages=[gateway_pb2.ChatMessage(role="user", text="Hi")], max_tokens=10
        )
        reply = await insight.ExplainRoute(
            insight_pb2.ExplainRouteRequest(params=params), metadata=(("authorization", f"Bearer {DEV_KEY}"),)
        )
        assert [t.model_id for t in reply.targets] == ["smollm2-135m-instruct"]
        assert (reply.estimated_prompt_tokens, reply.estimated_completion_tokens) == (5, 10)
        assert reply.reason
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            params.max_tokens = 0
            await insight.ExplainRoute(
                insight_pb2.ExplainRouteRequest(params=params),
                metadata=(("authorization", f"Bearer {DEV_KEY}"),),
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("max_tokens:")
