"""The CostLedger as a real process against a real Redis, over gRPC."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from tests.support import internal_channel, mesh_environ
from tools.mesh import Mesh

pytestmark = pytest.mark.integration

# priced-model: 1000 input + 2000 output tokens = 150 + 1200 = 1350 micro-dollars.
PRICES = (
    "{priced-model: {input_per_mtok_usd: 0.15, output_per_mtok_usd: 0.6},"
    " other-model: {input_per_mtok_usd: 2.5, output_per_mtok_usd: 10}}"
)
COST_1000_2000 = 1350


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("ledger-mesh"), mesh_environ({"SOPHIA__LEDGER__PRICES": PRICES}))
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


def _at(text: str) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(datetime.fromisoformat(text).replace(tzinfo=UTC))
    return timestamp


def _usage(tenant: str, request_id: str | None = None, **fields) -> pb.RecordUsageRequest:
    values = {"model_id": "priced-model", "provider": "openai", "input_tokens": 1000, "output_tokens": 2000}
    values.update(fields)
    return pb.RecordUsageRequest(
        request_id=uuid.uuid4().hex if request_id is None else request_id, tenant_id=tenant, **values
    )


def _rows(report: pb.GetUsageReportResponse) -> list[tuple]:
    return [(r.key, r.requests, r.input_tokens, r.output_tokens, r.cost_micros) for r in report.rows]


async def _requests_this_month(ledger, tenant: str) -> int:
    return (await ledger.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant))).total.requests


def _budget_warnings(mesh: Mesh, tenant: str, alert: str = "spent") -> list[int]:
    """The percentages of the tenant's budget alerts of one kind ("spent" or "projected") in the log."""
    percents = []
    for line in mesh.log_path("ledger").read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if (
            entry.get("level") == "WARNING"
            and entry.get("tenant_id") == tenant
            and entry.get("alert") == alert
        ):
            percents.append(entry["percent"])
    return sorted(percents)


async def test_retried_record_is_counted_once_and_reports_the_original_cost(ledger, tenant) -> None:
    first = await ledger.RecordUsage(_usage(tenant, "req-1"))
    retry = await ledger.RecordUsage(_usage(tenant, "req-1"))

    assert (first.cost_micros, first.duplicate) == (COST_1000_2000, False)
    assert (retry.cost_micros, retry.duplicate) == (COST_1000_2000, True)
    assert (await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))).spent_micros == COST_1000_2000
    assert await _requests_this_month(ledger, tenant) == 1


async def test_cache_hits_and_unpriced_models_record_tokens_at_no_cost(ledger, tenant) -> None:
    cached = await ledger.RecordUsage(_usage(tenant, cached=True))
    local = await ledger.RecordUsage(_usage(tenant, model_id="smollm2-135m-instruct", provider="local"))

    assert (cached.cost_micros, local.cost_micros) == (0, 0)
    report = await ledger.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant))
    assert _rows(report) == [("priced-model", 1, 1000, 2000, 0), ("smollm2-135m-instruct", 1, 1000, 2000, 0)]


async def test_concurrent_duplicates_are_counted_exactly_once(ledger, tenant) -> None:
    replies = await asyncio.gather(*(ledger.RecordUsage(_usage(tenant, "same-request")) for _ in range(50)))
    assert [reply.duplicate for reply in replies].count(False) == 1
    assert {reply.cost_micros for reply in replies} == {COST_1000_2000}

    # Distinct requests recorded at the same moment are all counted.
    await asyncio.gather(*(ledger.RecordUsage(_usage(tenant)) for _ in range(20)))
    budget = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
    assert budget.spent_micros == 21 * COST_1000_2000
    assert await _requests_this_month(ledger, tenant) == 21


async def test_soft_budget_alerts_once_per_threshold_and_hard_stop_refuses(mesh, ledger, tenant) -> None:
    await ledger.SetBudget(
        pb.SetBudgetRequest(
            tenant_id=tenant, monthly_limit_micros=2 * COST_1000_2000, alert_percentages=[100, 50]
        )
    )
    await ledger.RecordUsage(_usage(tenant))
    status = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
    assert (status.allowed, status.spent_micros, list(status.alerts_crossed)) == (True, COST_1000_2000, [50])

    for _ in range(3):
        await ledger.RecordUsage(_usage(tenant))
    status = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
    # A soft budget only alerts, even well past its limit.
    assert (status.allowed, status.limit_micros, list(status.alerts_crossed)) == (
        True,
        2 * COST_1000_2000,
        [50, 100],
    )
    # The ledger logs before it answers, so the lines are there by now.
    assert _budget_warnings(mesh, tenant) == [50, 100]

    await ledger.SetBudget(
        pb.SetBudgetRequest(tenant_id=tenant, monthly_limit_micros=2 * COST_1000_2000, hard_stop=True)
    )
    status = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
    assert (status.allowed, status.spent_micros) == (False, 4 * COST_1000_2000)

    # Empty alert percentages take the configured defaults (50, 80, 100): 4 × 1350 is 86% of 6250.
    await ledger.SetBudget(pb.SetBudgetRequest(tenant_id=tenant, monthly_limit_micros=6250, hard_stop=True))
    status = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
    assert (status.allowed, list(status.alerts_crossed)) == (True, [50, 80])

    await ledger.SetBudget(pb.SetBudgetRequest(tenant_id=tenant, monthly_limit_micros=0, hard_stop=True))
    status = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
    assert (status.allowed, status.limit_micros, list(status.alerts_crossed)) == (True, 0, [])


async def test_usage_report_groups_a_time_range_by_model_provider_and_day(ledger, tenant) -> None:
    records = [
        ("2024-02-29T23:59:59", "priced-model", "openai", 1000, 2000),  # before the range
        ("2024-03-01T08:00:00", "priced-model", "openai", 1000, 2000),  # 1350
        ("2024-03-01T23:59:59.500000", "other-model", "acme", 1000, 100),  # 2500 + 1000
        ("2024-03-02T00:00:00", "priced-model", "openai", 2000, 0),  # 300
        ("2024-03-02T12:00:00", "smollm2-135m-instruct", "local", 50, 60),  # free
        ("2024-03-03T00:00:00", "priced-model", "openai", 1000, 2000),  # at the end: excluded
    ]
    for when, model, provider, tokens_in, tokens_out in records:
        await ledger.RecordUsage(
            _usage(
                tenant,
                model_id=model,
                provider=provider,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                occurred_at=_at(when),
            )
        )

    def report(group_by):
        return ledger.GetUsageReport(
            pb.GetUsageReportRequest(
                tenant_id=tenant, start_time=_at("2024-03-01"), end_time=_at("2024-03-03"), group_by=group_by
            )
        )

    by_model = await report(pb.GROUP_BY_MODEL)
    assert _rows(by_model) == [
        ("other-model", 1, 1000, 100, 3500),
        ("priced-model", 2, 3000, 2000, 1650),
        ("smollm2-135m-instruct", 1, 50, 60, 0),
    ]
    assert (by_model.total.requests, by_model.total.cost_micros) == (4, 5150)
    assert _rows(await report(pb.GROUP_BY_UNSPECIFIED)) == _rows(by_model)
    assert _rows(await report(pb.GROUP_BY_PROVIDER)) == [
        ("acme", 1, 1000, 100, 3500),
        ("local", 1, 50, 60, 0),
        ("openai", 2, 3000, 2000, 1650),
    ]
    assert _rows(await report(pb.GROUP_BY_DAY)) == [
        ("2024-03-01", 2, 2000, 2100, 4850),
        ("2024-03-02", 2, 2050, 60, 300),
    ]
    # Spend counts toward the UTC month the usage happened in, not the current one.
    assert (await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))).spent_micros == 0


async def test_list_prices_comes_from_the_config_in_micros(ledger) -> None:
    prices = (await ledger.ListPrices(pb.ListPricesRequest())).prices
    assert [(p.model_id, p.input_micros_per_mtok, p.output_micros_per_mtok) for p in prices] == [
        ("other-model", 2_500_000, 10_000_000),
        ("priced-model", 150_000, 600_000),
    ]


INVALID = [
    ("RecordUsage", _usage("t", request_id=""), "request_id"),
    ("RecordUsage", _usage("t", request_id="r" * 129), "request_id"),
    ("RecordUsage", _usage(""), "tenant_id"),
    ("RecordUsage", _usage("t", model_id=""), "model_id"),
    ("RecordUsage", _usage("t", input_tokens=-1), "input_tokens"),
    ("RecordUsage", _usage("t", output_tokens=-1), "output_tokens"),
    ("RecordUsage", _usage("t", occurred_at=Timestamp(seconds=10**12)), "occurred_at"),
    ("RecordUsage", _usage("t", occurred_at=_at("2999-01-01")), "occurred_at"),
    ("CheckBudget", pb.CheckBudgetRequest(), "tenant_id"),
    ("SetBudget", pb.SetBudgetRequest(monthly_limit_micros=1), "tenant_id"),
    ("SetBudget", pb.SetBudgetRequest(tenant_id="t", monthly_limit_micros=-1), "monthly_limit_micros"),
    ("SetBudget", pb.SetBudgetRequest(tenant_id="t", alert_percentages=[50, 0]), "alert_percentages[1]"),
    ("SetBudget", pb.SetBudgetRequest(tenant_id="t", alert_percentages=[1001]), "alert_percentages[0]"),
    ("GetUsageReport", pb.GetUsageReportRequest(), "tenant_id"),
    (
        "GetUsageReport",
        pb.GetUsageReportRequest(tenant_id="t", start_time=_at("2024-03-02"), end_time=_at("2024-03-01")),
        "start_time",
    ),
    (
        "GetUsageReport",
        pb.GetUsageReportRequest(tenant_id="t", start_time=_at("2023-01-01"), end_time=_at("2024-03-01")),
        "end_time",
    ),
    ("GetUsageReport", pb.GetUsageReportRequest(tenant_id="t", group_by=99), "group_by"),
    ("RecordUsage", _usage("t", difficulty=99), "difficulty"),
    ("RecordUsage", _usage("t", attempts=-1), "attempts"),
    ("RecordUsage", _usage("t", task_type="t" * 65), "task_type"),
    ("RecordUsage", _usage("t", prompt_fingerprint="f" * 129), "prompt_fingerprint"),
    ("RecordUsage", _usage("t", planned_model_id="m" * 257), "planned_model_id"),
    ("RecordUsage", _usage("t", call_id="c" * 65), "call_id"),
    ("GetRecommendations", pb.GetRecommendationsRequest(), "tenant_id"),
    ("GetRecommendations", pb.GetRecommendationsRequest(tenant_id="a{b}"), "tenant_id"),
]


@pytest.mark.parametrize(("method", "request_message", "field"), INVALID)
async def test_invalid_requests_are_rejected_naming_the_field(ledger, method, request_message, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(ledger, method)(request_message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")


async def _health(mesh: Mesh) -> int:
    async with internal_channel(mesh, "ledger") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=20, wait_for_ready=True
        )
    return reply.status


async def test_records_survive_ledger_and_redis_restarts(mesh, tenant) -> None:
    async def state() -> tuple:
        # A fresh channel each time: an old one may still be backing off from the restart.
        async with internal_channel(mesh, "ledger") as channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
            retry = await ledger.RecordUsage(_usage(tenant, "durable-1"))
            budget = await ledger.CheckBudget(pb.CheckBudgetRequest(tenant_id=tenant))
            report = await ledger.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant))
        return retry.duplicate, budget.spent_micros, budget.limit_micros, _rows(report)

    async with internal_channel(mesh, "ledger") as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        await ledger.RecordUsage(_usage(tenant, "durable-1"))
        await ledger.SetBudget(pb.SetBudgetRequest(tenant_id=tenant, monthly_limit_micros=10_000))
    expected = (True, COST_1000_2000, 10_000, [("priced-model", 1, 1000, 2000, COST_1000_2000)])
    assert await state() == expected

    mesh.stop("ledger")
    mesh.start("ledger")
    mesh.wait_ready(["ledger"], timeout=60)
    assert await state() == expected

    # Redis goes away under a running ledger: a clear UNAVAILABLE, not INTERNAL.
    mesh.stop("redis")
    async with internal_channel(mesh, "ledger") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger_pb2_grpc.LedgerServiceStub(channel).CheckBudget(
                pb.CheckBudgetRequest(tenant_id=tenant), wait_for_ready=True
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis" in caught.value.details()

    # A ledger started without Redis stays NOT_SERVING until Redis (same AOF directory) is back.
    mesh.stop("ledger")
    mesh.start("ledger")
    assert await _health(mesh) == health_pb2.HealthCheckResponse.NOT_SERVING
    mesh.start("redis")
    mesh.wait_ready(["redis", "ledger"], timeout=60)
    assert await state() == expected


async def test_a_batch_gives_each_record_its_own_result(ledger, tenant) -> None:
    first = _usage(tenant, "batch-1")
    await ledger.RecordUsage(first)
    batch = [
        _usage(tenant, "batch-2"),
        first,  # recorded before: a duplicate, nothing added
        _usage(tenant, "batch-1", input_tokens=5),  # the same id with other usage: a conflict
        _usage(tenant, "batch-3", input_tokens=-1),  # invalid
        _usage(tenant, "batch-4", model_id="unpriced"),
    ]
    reply = await ledger.RecordUsages(pb.RecordUsagesRequest(records=batch))
    assert [r.status for r in reply.results] == [
        pb.RECORD_STATUS_RECORDED,
        pb.RECORD_STATUS_DUPLICATE,
        pb.RECORD_STATUS_CONFLICT,
        pb.RECORD_STATUS_INVALID,
        pb.RECORD_STATUS_RECORDED,
    ]
    assert [r.cost_micros for r in reply.results] == [COST_1000_2000, COST_1000_2000, 0, 0, 0]
    assert reply.results[3].error.startswith("records[3].input_tokens:")
    report = await ledger.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant))
    assert (report.total.requests, report.total.cost_micros) == (3, 2 * COST_1000_2000)
    again = await ledger.RecordUsages(pb.RecordUsagesRequest(records=batch[:2]))
    assert [r.status for r in again.results] == [pb.RECORD_STATUS_DUPLICATE] * 2
    assert await _requests_this_month(ledger, tenant) == 3


async def test_an_oversized_batch_is_refused_whole(ledger, tenant) -> None:
    records = [_usage(tenant) for _ in range(1001)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ledger.RecordUsages(pb.RecordUsagesRequest(records=records))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records" in refused.value.details()
    assert await _requests_this_month(ledger, tenant) == 0
