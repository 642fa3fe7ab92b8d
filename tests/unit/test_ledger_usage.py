"""Pure ledger rules: validation, UTC months, report ranges, report grouping and budgets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from libs.errors import InvalidArgument
from services.ledger.budget import Budget, budget_status, crossed_thresholds, make_budget
from services.ledger.usage import (
    UsageEvent,
    UsageRecord,
    UsageSummary,
    month_bounds,
    month_key,
    report_range,
    validate_event,
)


def summarize(records, group_by):
    summary = UsageSummary(group_by)
    for record in records:
        summary.add(record)
    return summary.report()


def _record(model: str, provider: str, when: datetime, tokens=(10, 20), cost: int = 5) -> UsageRecord:
    return UsageRecord(
        request_id=f"{model}-{when.isoformat()}",
        tenant_id="t",
        api_key_id="k",
        model_id=model,
        provider=provider,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cached=False,
        cost_micros=cost,
        occurred_at=when,
    )


RECORDS = [
    _record("zeta", "openai", datetime(2024, 3, 2, 0, 0, tzinfo=UTC), (1, 2), 3),
    _record("alpha", "local", datetime(2024, 3, 1, 23, 59, tzinfo=UTC), (10, 20), 0),
    _record("zeta", "openai", datetime(2024, 3, 1, 8, 0, tzinfo=UTC), (100, 200), 30),
    # 2024-03-02 01:30 in UTC, although it is still 2024-03-01 in New York.
    _record("alpha", "local", datetime(2024, 3, 1, 20, 30, tzinfo=timezone(timedelta(hours=-5))), (5, 5), 0),
]


def _rows(group_by):
    report = summarize(RECORDS, group_by)
    return [(r.key, r.requests, r.input_tokens, r.output_tokens, r.cost_micros) for r in report.rows]


def test_report_groups_by_model_sorted_by_key() -> None:
    assert _rows("model") == [("alpha", 2, 15, 25, 0), ("zeta", 2, 101, 202, 33)]


def test_report_groups_by_provider() -> None:
    assert _rows("provider") == [("local", 2, 15, 25, 0), ("openai", 2, 101, 202, 33)]


def test_report_groups_by_utc_day() -> None:
    assert _rows("day") == [("2024-03-01", 2, 110, 220, 30), ("2024-03-02", 2, 6, 7, 3)]


def test_report_total_covers_every_record() -> None:
    total = summarize(RECORDS, "day").total
    assert (total.requests, total.input_tokens, total.output_tokens, total.cost_micros) == (4, 116, 227, 33)


def test_empty_report_has_zero_total() -> None:
    report = summarize([], "model")
    assert report.rows == [] and report.total.requests == 0 and report.total.cost_micros == 0


def test_months_are_utc_calendar_months() -> None:
    assert month_key(datetime(2024, 2, 29, 23, 0, tzinfo=timezone(timedelta(hours=-2)))) == "2024-03"
    assert month_bounds(datetime(2024, 12, 31, 23, 59, tzinfo=UTC)) == (
        datetime(2024, 12, 1, tzinfo=UTC),
        datetime(2025, 1, 1, tzinfo=UTC),
    )


NOW = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)


def test_report_range_defaults_to_the_current_month() -> None:
    assert report_range(None, None, NOW) == (
        datetime(2024, 3, 1, tzinfo=UTC),
        datetime(2024, 4, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        (NOW, NOW, "start_time"),
        (NOW, NOW - timedelta(seconds=1), "start_time"),
        (NOW - timedelta(days=401), NOW, "end_time"),
    ],
)
def test_report_range_rejects_empty_inverted_and_too_long_ranges(start, end, field) -> None:
    with pytest.raises(InvalidArgument) as caught:
        report_range(start, end, NOW)
    assert caught.value.field == field


def test_report_range_accepts_exactly_400_days() -> None:
    assert report_range(NOW - timedelta(days=400), NOW, NOW) == (NOW - timedelta(days=400), NOW)


VALID = UsageEvent(request_id="r", tenant_id="t", model_id="m", input_tokens=0, output_tokens=0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"request_id": "r" * 129}, "request_id"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "a}b"}, "tenant_id"),
        ({"model_id": ""}, "model_id"),
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": -1}, "output_tokens"),
        ({"occurred_at": datetime(1969, 12, 31, 23, 59, tzinfo=UTC)}, "occurred_at"),
        ({"occurred_at": NOW + timedelta(days=1, seconds=1)}, "occurred_at"),
    ],
)
def test_invalid_events_name_the_field(changes, field) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_event(UsageEvent(**{**VALID.__dict__, **changes}), NOW)
    assert caught.value.field == field


def test_valid_event_passes() -> None:
    validate_event(UsageEvent(**{**VALID.__dict__, "request_id": "r" * 128}), NOW)
    validate_event(UsageEvent(**{**VALID.__dict__, "occurred_at": NOW + timedelta(hours=23)}), NOW)
    validate_event(UsageEvent(**{**VALID.__dict__, "occurred_at": datetime(1970, 1, 1, tzinfo=UTC)}), NOW)


def test_budget_defaults_and_normalises_alert_percentages() -> None:
    assert make_budget(100, [], False, [50, 80, 100]).alert_percentages == (50, 80, 100)
    assert make_budget(100, [90, 10, 90], True, [50]).alert_percentages == (10, 90)


@pytest.mark.parametrize(
    ("limit", "percentages", "field"),
    [
        (-1, [], "monthly_limit_micros"),
        (10, [50, 0], "alert_percentages[1]"),
        (10, [1001], "alert_percentages[0]"),
    ],
)
def test_invalid_budgets_name_the_field(limit, percentages, field) -> None:
    with pytest.raises(InvalidArgument) as caught:
        make_budget(limit, percentages, False, [50])
    assert caught.value.field == field


def test_thresholds_are_crossed_exactly_at_the_percentage() -> None:
    budget = Budget(monthly_limit_micros=1000, alert_percentages=(50, 80, 100, 150), hard_stop=False)
    assert crossed_thresholds(499, budget) == ()
    assert crossed_thresholds(500, budget) == (50,)
    assert crossed_thresholds(1000, budget) == (50, 80, 100)
    assert crossed_thresholds(1500, budget) == (50, 80, 100, 150)
    assert crossed_thresholds(10**9, Budget(0, (50,), True)) == ()
    assert crossed_thresholds(10**9, None) == ()


def test_only_a_hard_stop_budget_at_its_limit_refuses() -> None:
    hard = Budget(monthly_limit_micros=1000, alert_percentages=(50,), hard_stop=True)
    soft = Budget(monthly_limit_micros=1000, alert_percentages=(50,), hard_stop=False)
    assert budget_status(999, hard).allowed
    assert not budget_status(1000, hard).allowed
    assert budget_status(5000, soft).allowed
    assert budget_status(5000, Budget(0, (50,), True)).allowed
    status = budget_status(5000, None)
    assert (status.allowed, status.limit_micros, status.alerts_crossed) == (True, 0, ())
