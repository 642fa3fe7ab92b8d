"""InsightService's conversions of the CostLedger's answers for the public API (micro-dollars → dollars,
ledger enums → public enums), shared by the tenant's and the admin's recommendation RPCs."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from sophia.gateway.v1 import admin_pb2, insight_pb2
from sophia.ledger.v1 import ledger_pb2

from services.gateway.api.insight_servicer import INT32_MAX, recommendation_fields, usage_row


def test_recommendations_convert_to_dollars_and_public_enums_for_both_apis() -> None:
    when = Timestamp(seconds=1_741_000_000)
    projection = ledger_pb2.BudgetProjection(
        month="2025-03",
        spent_micros=1_500_000,
        limit_micros=2_000_000,
        linear_micros=3_000_000,
        trend_micros=2_500_000,
    )
    reply = ledger_pb2.GetRecommendationsResponse(
        recommendations=[
            ledger_pb2.Recommendation(
                kind=ledger_pb2.RECOMMENDATION_KIND_CHEAPER_MODEL,
                summary="s",
                estimated_monthly_saving_micros=28_200,
                evidence_count=7,
                evidence=[
                    ledger_pb2.UsageEvidence(
                        request_id="r", model_id="m", occurred_at=when, cost_micros=7_500
                    )
                ],
                model_id="dear",
                alternative_model_id="cheap",
                task_type="summarization",
                difficulty=ledger_pb2.DIFFICULTY_COMPLEX,
            ),
            ledger_pb2.Recommendation(
                kind=ledger_pb2.RECOMMENDATION_KIND_BUDGET_PROJECTION, projection=projection
            ),
        ],
        window_start=when,
        window_end=when,
        projection=projection,
    )
    tenant = insight_pb2.GetTenantRecommendationsResponse(tenant_id="t", **recommendation_fields(reply))
    admin = admin_pb2.GetRecommendationsResponse(tenant_id="t", **recommendation_fields(reply))

    cheaper, budget = tenant.recommendations
    assert (cheaper.kind, cheaper.difficulty) == (
        insight_pb2.RECOMMENDATION_KIND_CHEAPER_MODEL,
        insight_pb2.DIFFICULTY_COMPLEX,
    )
    assert (cheaper.estimated_monthly_saving_usd, cheaper.evidence_count) == (0.0282, 7)
    assert (cheaper.evidence[0].cost_usd, cheaper.evidence[0].occurred_at) == (0.0075, when)
    assert (cheaper.model_id, cheaper.alternative_model_id, cheaper.task_type) == (
        "dear",
        "cheap",
        "summarization",
    )
    assert not cheaper.HasField("projection")
    assert budget.kind == insight_pb2.RECOMMENDATION_KIND_BUDGET_PROJECTION
    assert (budget.projection.linear_usd, budget.projection.trend_usd) == (3.0, 2.5)
    assert (tenant.projection.spent_usd, tenant.projection.limit_usd) == (1.5, 2.0)
    assert admin.recommendations == tenant.recommendations and admin.projection == tenant.projection


def test_usage_rows_convert_to_dollars_and_saturate_the_public_counters() -> None:
    row = usage_row(
        ledger_pb2.UsageRow(key="m", requests=3, input_tokens=2**40, output_tokens=5, cost_micros=1_250)
    )
    assert (row.key, row.requests, row.input_tokens, row.output_tokens, row.cost_usd) == (
        "m",
        3,
        INT32_MAX,
        5,
        0.00125,
    )
