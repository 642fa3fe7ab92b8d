"""Cost recommendations and month-end projections, as pure functions over usage records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from libs.config import PriceConfig
from libs.pricing import PriceTable
from services.ledger.budget import Budget
from services.ledger.projection import project, projected_thresholds, trend_days, trend_start
from services.ledger.recommendations import (
    Evidence,
    RecommendationKind,
    RecommendationSettings,
    UsageAnalysis,
)
from services.ledger.usage import Difficulty, UsageRecord

PRICES = PriceTable(
    {
        "big": PriceConfig(input_per_mtok_usd=2.5, output_per_mtok_usd=10),
        "small": PriceConfig(input_per_mtok_usd=0.15, output_per_mtok_usd=0.6),
    }
)
# 1000 input + 500 output tokens: big 2500 + 5000, small 150 + 300 micro-dollars.
BIG, SMALL = 7500, 450
NOW = datetime(2025, 3, 16, 12, 0, tzinfo=UTC)
SETTINGS = RecommendationSettings(min_requests=3, fallback_rate=0.2, evidence_rows=2)
NO_BUDGET = project(NOW, 0, 0, 0)


def record(
    request_id: str,
    model: str = "big",
    *,
    ago: timedelta = timedelta(days=1),
    cached: bool = False,
    task_type: str = "",
    difficulty: Difficulty = Difficulty.UNSPECIFIED,
    planned: str = "",
    fingerprint: str = "",
    tokens: tuple[int, int] = (1000, 500),
) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant_id="t",
        api_key_id="k",
        model_id=model,
        provider="p",
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cached=cached,
        cost_micros=PRICES.cost_micros(model, *tokens, cached=cached),
        occurred_at=NOW - ago,
        task_type=task_type,
        difficulty=difficulty,
        planned_model_id=planned,
        attempts=1 if planned else 0,
        prompt_fingerprint=fingerprint,
    )


def advise(records, projection=NO_BUDGET, settings=SETTINGS):
    analysis = UsageAnalysis(PRICES, settings, NOW)
    for item in sorted(records, key=lambda r: r.occurred_at):
        analysis.add(item)
    return analysis.recommendations(projection)


def ids(recommendation) -> list[str]:
    return [r.request_id for r in recommendation.evidence]


# --- cheaper models ---------------------------------------------------------------------------------


def test_a_cheaper_model_that_answered_the_same_work_is_recommended_with_the_exact_saving() -> None:
    work = {"task_type": "summarize", "difficulty": Difficulty.SIMPLE}
    records = [record(f"big-{i}", "big", **work) for i in range(4)]
    records += [record(f"small-{i}", "small", **work) for i in range(3)]

    (advice,) = advise(records)

    assert advice.kind is RecommendationKind.CHEAPER_MODEL
    assert (advice.model_id, advice.alternative_model_id) == ("big", "small")
    assert (advice.task_type, advice.difficulty) == ("summarize", Difficulty.SIMPLE)
    assert advice.monthly_saving_micros == 4 * (BIG - SMALL)
    # Cites both: the records that would have cost less, and the ones showing the cheaper model does it.
    assert advice.evidence_count == 7
    assert ids(advice) == ["big-0", "big-1", "small-0", "small-1"]
    assert "summarize/simple" in advice.summary


def test_an_unpriced_local_model_that_does_the_work_saves_everything() -> None:
    work = {"task_type": "chat"}
    records = [record(f"big-{i}", "big", **work) for i in range(3)]
    records += [record(f"local-{i}", "smollm2", **work) for i in range(3)]
    (advice,) = advise(records)
    assert (advice.alternative_model_id, advice.monthly_saving_micros) == ("smollm2", 3 * BIG)


def test_no_comparison_across_kinds_of_work_without_a_task_type_or_with_thin_evidence() -> None:
    # Different difficulty: the small model has not shown it handles hard work.
    hard = [record(f"big-{i}", "big", task_type="code", difficulty=Difficulty.COMPLEX) for i in range(5)]
    easy = [record(f"small-{i}", "small", task_type="code", difficulty=Difficulty.SIMPLE) for i in range(5)]
    # Unclassified usage is never compared.
    unclassified = [record(f"u-big-{i}", "big") for i in range(5)] + [
        record(f"u-small-{i}", "small") for i in range(5)
    ]
    # Two answers by the cheaper model are below min_requests (3).
    thin = [record(f"t-big-{i}", "big", task_type="qa") for i in range(5)]
    thin += [record(f"t-small-{i}", "small", task_type="qa") for i in range(2)]
    assert advise(hard + easy + unclassified + thin) == []


def test_usage_older_than_the_window_and_cache_hits_are_left_out() -> None:
    work = {"task_type": "summarize"}
    old = [record(f"old-{i}", "big", ago=timedelta(days=31), **work) for i in range(3)]
    hits = [record(f"hit-{i}", "big", cached=True, **work) for i in range(3)]
    cheap = [record(f"small-{i}", "small", **work) for i in range(3)]
    assert advise(old + hits + cheap) == []


# --- repeated prompts -------------------------------------------------------------------------------


def test_repeated_prompts_that_were_paid_again_are_the_cache_opportunity() -> None:
    records = [
        record("a-1", fingerprint="A", ago=timedelta(hours=9)),  # first answer: had to be paid
        record("a-2", fingerprint="A", ago=timedelta(hours=8)),
        record("a-3", fingerprint="A", ago=timedelta(hours=7), cached=True),  # served by the cache
        record("a-4", fingerprint="A", ago=timedelta(hours=6), tokens=(2000, 0)),
        record("b-1", fingerprint="B", ago=timedelta(hours=5)),
        record("b-2", fingerprint="B", ago=timedelta(hours=4)),
        record("c-1", fingerprint="C", ago=timedelta(hours=3)),  # never repeated
        record("a-small", "small", fingerprint="A", ago=timedelta(hours=2)),  # another model: not a repeat
    ]
    (advice,) = advise(records)
    assert advice.kind is RecommendationKind.REPEATED_PROMPTS
    assert advice.model_id == "big"
    assert advice.monthly_saving_micros == BIG + 5000 + BIG
    assert advice.evidence_count == 3
    assert ids(advice) == ["a-2", "b-2"]  # the costliest two (evidence_rows = 2), of equal cost the oldest
    assert "repeated 2 earlier prompts" in advice.summary


def test_fewer_repeats_than_min_requests_are_not_reported() -> None:
    records = [record("a-1", fingerprint="A"), record("a-2", fingerprint="A", ago=timedelta(hours=1))]
    assert advise(records) == []


# --- fallbacks --------------------------------------------------------------------------------------


def test_a_planned_model_that_often_falls_back_is_reported_with_what_the_fallbacks_cost_extra() -> None:
    # 5 requests planned for "small"; 2 were answered by "big" after "small" failed: 40% ≥ 20%.
    records = [record(f"ok-{i}", "small", planned="small") for i in range(3)]
    records += [record(f"fb-{i}", "big", planned="small") for i in range(2)]
    (advice,) = advise(records)
    assert advice.kind is RecommendationKind.FREQUENT_FALLBACK
    assert (advice.model_id, advice.requests, advice.evidence_count) == ("small", 5, 2)
    assert advice.monthly_saving_micros == 2 * (BIG - SMALL)
    assert "2 of 5 requests (40%)" in advice.summary


def test_rare_fallbacks_and_cheaper_fallbacks() -> None:
    rare = [record(f"ok-{i}", "small", planned="small") for i in range(9)]
    rare.append(record("fb", "big", planned="small"))  # 10 %
    assert advise(rare) == []
    # A fallback that cost less still is a reliability problem, but saves nothing by itself.
    cheaper = [record(f"fb-{i}", "small", planned="big") for i in range(3)]
    (advice,) = advise(cheaper)
    assert (advice.kind, advice.monthly_saving_micros) == (RecommendationKind.FREQUENT_FALLBACK, 0)


# --- the budget -------------------------------------------------------------------------------------


def test_a_projection_over_the_budget_cites_the_months_costliest_records() -> None:
    month = [
        record("m-1", ago=timedelta(days=2)),
        record("m-2", ago=timedelta(days=1), tokens=(4000, 0)),
        record("m-3", "small"),
        record("m-free", "smollm2"),  # costs nothing: not evidence of spend
    ]
    last_month = [record("old", ago=timedelta(days=20))]
    projection = project(NOW, 20_000, 0, 30_000)
    (advice,) = advise(month + last_month, projection)
    assert advice.kind is RecommendationKind.BUDGET_PROJECTION
    assert (advice.monthly_saving_micros, advice.evidence_count) == (0, 3)
    assert ids(advice) == ["m-2", "m-1"]
    assert advice.projection == projection


def test_recommendations_come_largest_saving_first() -> None:
    records = [record(f"r-{i}", fingerprint="R", ago=timedelta(hours=10 - i)) for i in range(4)]
    records += [record(f"fb-{i}", "big", planned="small") for i in range(4)]
    records += [record("budget", ago=timedelta(hours=1))]
    kinds = [r.kind for r in advise(records, project(NOW, 10**6, 0, 1))]
    assert kinds == [
        RecommendationKind.FREQUENT_FALLBACK,  # 4 × (7500 − 450) = 28200
        RecommendationKind.REPEATED_PROMPTS,  # 3 × 7500 = 22500
        RecommendationKind.BUDGET_PROJECTION,  # 0
    ]


def test_evidence_keeps_the_costliest_rows_and_counts_them_all() -> None:
    evidence = Evidence(keep=2)
    for i, tokens in enumerate([(10, 0), (3000, 0), (5, 0), (3000, 0), (1000, 0)]):
        evidence.add(record(f"r{i}", tokens=tokens))
    assert evidence.count == 5
    assert [r.request_id for r in evidence.rows()] == ["r1", "r3"]


# --- projections ------------------------------------------------------------------------------------


def test_projections_extrapolate_the_months_rate_and_the_last_seven_days() -> None:
    # March has 31 days; at 16 March 12:00, 15.5 days have passed and 15.5 remain.
    projection = project(NOW, spent_micros=10_000, recent_spend_micros=7_000, limit_micros=27_000)
    assert projection.month == "2025-03"
    assert projection.linear_micros == 20_000
    # The recent window runs from 10 March 00:00 (6.5 days): 7000 / 6.5 days × 15.5 days more.
    assert projection.trend_micros == 10_000 + 7_000 * 155 // 65
    assert trend_start(NOW) == datetime(2025, 3, 10, tzinfo=UTC)
    assert trend_days(NOW) == [f"2025-03-{day:02d}" for day in range(10, 17)]
    assert not projection.exceeds_budget
    assert project(NOW, 10_000, 7_000, 26_000).exceeds_budget  # by the trend only


def test_the_recent_window_starts_no_earlier_than_the_month() -> None:
    early = datetime(2025, 3, 3, 6, 0, tzinfo=UTC)
    assert trend_days(early) == ["2025-03-01", "2025-03-02", "2025-03-03"]
    start = datetime(2025, 3, 1, tzinfo=UTC)
    assert project(start, 0, 0, 100).linear_micros == 0  # nothing elapsed: nothing to extrapolate


def test_projection_alerts_name_the_thresholds_the_projection_reaches_before_the_spend_does() -> None:
    budget = Budget(monthly_limit_micros=40_000, alert_percentages=(25, 50, 80, 100), hard_stop=False)
    projection = project(NOW, 15_000, 0, budget.monthly_limit_micros)  # linear 30 000 = 75 %
    # 25 % is already spent (the spend alert's business); 50 % is projected; 80 % is not reached.
    assert projected_thresholds(projection, budget, NOW, timedelta(hours=24)) == (50,)
    # Too early in the month to trust an extrapolation.
    assert projected_thresholds(projection, budget, NOW, timedelta(days=16)) == ()
    assert projected_thresholds(projection, None, NOW, timedelta(0)) == ()
