"""CostLedger recommendations and projection alerts, as a real process against a real Redis, over gRPC."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from tests.support import internal_channel, mesh_environ
from tools.mesh import Mesh

pytestmark = pytest.mark.integration

PRICES = (
    "{cheap-model: {input_per_mtok_usd: 0.15, output_per_mtok_usd: 0.6},"
    " dear-model: {input_per_mtok_usd: 2.5, output_per_mtok_usd: 10}}"
)
# 1000 input + 500 output tokens: dear 2500 + 5000, cheap 150 + 300 micro-dollars.
DEAR, CHEAP = 7500, 450


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    environ = mesh_environ(
        {
            "SOPHIA__LEDGER__PRICES": PRICES,
            # Projection alerts from the first minute of the month, so the test does not depend on the date.
            "SOPHIA__LEDGER__PROJECTION_MIN_ELAPSED_HOURS": "0",
        }
    )
    mesh = Mesh(tmp_path_factory.mktemp("recommendations-mesh"), environ)
    try:
        mesh.start("redis")
        mesh.start("ledger")
        mesh.wait_ready(["redis", "ledger"], timeout=60)
        yield mesh
    finally:
        mesh.stop_all()


@pytest.fixture
async def ledger(mesh):
    async with internal_channel(mesh, "ledger") as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


@pytest.fixture
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:8]}"


def _ago(delta: timedelta) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(datetime.now(UTC) - delta)
    return timestamp


def _usage(tenant: str, request_id: str, model: str, hours_ago: float, **fields) -> pb.RecordUsageRequest:
    return pb.RecordUsageRequest(
        request_id=request_id,
        tenant_id=tenant,
        model_id=model,
        provider="remote",
        input_tokens=1000,
        output_tokens=500,
        occurred_at=_ago(timedelta(hours=hours_ago)),
        **fields,
    )


def _summary(recommendation: pb.Recommendation) -> tuple:
    return (
        pb.RecommendationKind.Name(recommendation.kind),
        recommendation.model_id,
        recommendation.alternative_model_id,
        recommendation.estimated_monthly_saving_micros,
        recommendation.evidence_count,
    )


async def test_recommendations_on_seeded_usage_are_exactly_the_expected_ones(ledger, tenant) -> None:
    seeded = []
    # Summarization/simple: dear-model 4 times, cheap-model 3 times → cheaper model, 4 × (7500 − 450).
    work = {"task_type": "summarization", "difficulty": pb.DIFFICULTY_SIMPLE}
    seeded += [_usage(tenant, f"dear-{i}", "dear-model", 50 + i, **work) for i in range(4)]
    seeded += [_usage(tenant, f"cheap-{i}", "cheap-model", 40 + i, **work) for i in range(3)]
    # The same prompt answered by dear-model four times, none from the cache: 3 repeats paid again.
    seeded += [
        _usage(tenant, f"again-{i}", "dear-model", 30 - i, prompt_fingerprint="fp-1", task_type="chat")
        for i in range(4)
    ]
    # Planned for cheap-model 5 times; 2 answered by dear-model after it failed: 40 % fell back.
    seeded += [
        _usage(tenant, f"plan-ok-{i}", "cheap-model", 20 + i, planned_model_id="cheap-model")
        for i in range(3)
    ]
    seeded += [
        _usage(tenant, f"plan-fb-{i}", "dear-model", 10 + i, planned_model_id="cheap-model", attempts=2)
        for i in range(2)
    ]
    # Older than the 30-day window: counts for nothing.
    seeded += [_usage(tenant, f"old-{i}", "dear-model", 31 * 24 + i, **work) for i in range(5)]
    for request in seeded:
        await ledger.RecordUsage(request)

    reply = await ledger.GetRecommendations(pb.GetRecommendationsRequest(tenant_id=tenant))

    assert [_summary(r) for r in reply.recommendations] == [
        ("RECOMMENDATION_KIND_CHEAPER_MODEL", "dear-model", "cheap-model", 4 * (DEAR - CHEAP), 7),
        ("RECOMMENDATION_KIND_REPEATED_PROMPTS", "dear-model", "", 3 * DEAR, 3),
        ("RECOMMENDATION_KIND_FREQUENT_FALLBACK", "cheap-model", "", 2 * (DEAR - CHEAP), 2),
    ]
    cheaper, repeated, fallback = reply.recommendations
    assert (cheaper.task_type, cheaper.difficulty) == ("summarization", pb.DIFFICULTY_SIMPLE)
    # The evidence is the tenant's own records: the costliest 10 (all 7 here), dear ones first.
    assert [e.request_id for e in cheaper.evidence] == [
        *(f"dear-{i}" for i in (3, 2, 1, 0)),
        *(f"cheap-{i}" for i in (2, 1, 0)),
    ]
    assert {e.cost_micros for e in cheaper.evidence} == {DEAR, CHEAP}
    assert [e.request_id for e in repeated.evidence] == ["again-1", "again-2", "again-3"]
    assert (fallback.requests, sorted(e.request_id for e in fallback.evidence)) == (
        5,
        ["plan-fb-0", "plan-fb-1"],
    )
    # No budget: the projection is reported, and is no recommendation.
    assert reply.projection.limit_micros == 0
    assert reply.window_end.ToDatetime() - reply.window_start.ToDatetime() == timedelta(days=30)

    # Another tenant sees none of it.
    other = await ledger.GetRecommendations(pb.GetRecommendationsRequest(tenant_id=f"{tenant}-other"))
    assert list(other.recommendations) == []


async def test_usage_reports_group_by_the_recorded_task_type_and_difficulty(ledger, tenant) -> None:
    await ledger.RecordUsage(
        _usage(tenant, "a", "cheap-model", 1, task_type="code", difficulty=pb.DIFFICULTY_COMPLEX)
    )
    await ledger.RecordUsage(
        _usage(tenant, "b", "cheap-model", 1, task_type="code", difficulty=pb.DIFFICULTY_SIMPLE)
    )
    await ledger.RecordUsage(_usage(tenant, "c", "cheap-model", 1))
    now = datetime.now(UTC)
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(now - timedelta(days=1))
    end.FromDatetime(now + timedelta(hours=1))

    async def keys(group_by) -> list[tuple[str, int]]:
        report = await ledger.GetUsageReport(
            pb.GetUsageReportRequest(tenant_id=tenant, start_time=start, end_time=end, group_by=group_by)
        )
        return [(row.key, row.requests) for row in report.rows]

    assert await keys(pb.GROUP_BY_TASK_TYPE) == [("(unclassified)", 1), ("code", 2)]
    assert await keys(pb.GROUP_BY_DIFFICULTY) == [("(unclassified)", 1), ("complex", 1), ("simple", 1)]


def _ledger_warnings(mesh: Mesh, tenant: str) -> list[tuple[str, int]]:
    warnings = []
    for line in mesh.log_path("ledger").read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("level") == "WARNING" and entry.get("tenant_id") == tenant:
            warnings.append((entry["alert"], entry["percent"]))
    return warnings


async def test_a_projection_alert_fires_once_before_the_budget_is_spent(mesh, ledger, tenant) -> None:
    spent = 10 * DEAR
    # The month-end projection of `spent` now is at least the linear one; a budget of spent + linear puts
    # the 50 % threshold between what is spent and what is projected, whatever the day of the month.
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month_end = (month_start + timedelta(days=32)).replace(day=1)
    linear = spent * (month_end - month_start) / (now - month_start)
    limit = spent + int(linear)
    await ledger.SetBudget(
        pb.SetBudgetRequest(tenant_id=tenant, monthly_limit_micros=limit, alert_percentages=[50])
    )

    for i in range(10):
        await ledger.RecordUsage(_usage(tenant, f"r-{i}", "dear-model", 0))
    assert _ledger_warnings(mesh, tenant) == [("projected", 50)]

    # More usage (of an unpriced model, so the spend stays below 50 % on any day), still projected past
    # 50 %: no second alert.
    for i in range(3):
        await ledger.RecordUsage(_usage(tenant, f"more-{i}", "free-model", 0))
    status = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
    assert status.spent_micros * 100 < limit * 50  # raised before the budget's 50 % was spent
    assert _ledger_warnings(mesh, tenant) == [("projected", 50)]

    reply = await ledger.GetRecommendations(pb.GetRecommendationsRequest(tenant_id=tenant))
    projection = reply.projection
    assert (projection.spent_micros, projection.limit_micros) == (spent, limit)
    assert max(projection.linear_micros, projection.trend_micros) * 100 >= limit * 50
