"""Where this month's spend is heading: month-end projections and the alerts they raise, as pure functions.

Two projections, both in integer micro-dollars:
- linear: the spend so far, extrapolated over the whole UTC month at the month's average rate;
- trend: the spend so far, plus the rest of the month at the rate of the recent window (today and the
  six days before it, within the month), so that a surge shows before the monthly average catches up.
A projection alert fires for an alert percentage that the higher of the two reaches while the spend
itself has not: the warning comes before the budget is spent (the spend alert follows if it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.ledger.budget import Budget
from services.ledger.usage import day_key, month_bounds, month_key

TREND_DAYS = 7


@dataclass(frozen=True)
class Projection:
    month: str
    spent_micros: int
    # 0 → no budget set.
    limit_micros: int
    linear_micros: int
    trend_micros: int

    @property
    def highest_micros(self) -> int:
        return max(self.linear_micros, self.trend_micros)

    @property
    def exceeds_budget(self) -> bool:
        return self.limit_micros > 0 and self.highest_micros > self.limit_micros


def _micros(span: timedelta) -> int:
    return (span.days * 86_400 + span.seconds) * 1_000_000 + span.microseconds


def trend_start(now: datetime) -> datetime:
    """The start of the recent window: midnight six days before today, or the month's start if later."""
    month_start, _ = month_bounds(now)
    now = now.astimezone(UTC)
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    return max(month_start, today - timedelta(days=TREND_DAYS - 1))


def trend_days(now: datetime) -> list[str]:
    """The UTC days ("YYYY-MM-DD") of the recent window, oldest first."""
    first = trend_start(now)
    return [day_key(first + timedelta(days=offset)) for offset in range((now - first).days + 1)]


def project(now: datetime, spent_micros: int, recent_spend_micros: int, limit_micros: int) -> Projection:
    """The month-end projections at `now`, from the month's spend and the recent window's spend."""
    month_start, month_end = month_bounds(now)
    elapsed, remaining = _micros(now - month_start), _micros(month_end - now)
    recent_span = _micros(now - trend_start(now))
    linear = spent_micros * (elapsed + remaining) // elapsed if elapsed > 0 else spent_micros
    trend = spent_micros + (recent_spend_micros * remaining // recent_span if recent_span > 0 else 0)
    return Projection(
        month=month_key(now),
        spent_micros=spent_micros,
        limit_micros=limit_micros,
        linear_micros=linear,
        trend_micros=trend,
    )


def projected_thresholds(
    projection: Projection, budget: Budget | None, now: datetime, min_elapsed: timedelta
) -> tuple[int, ...]:
    """The alert percentages the projection reaches and the spend has not, once `min_elapsed` of the
    month has passed (earlier, a few requests extrapolate to nonsense)."""
    if budget is None or budget.monthly_limit_micros == 0:
        return ()
    month_start, _ = month_bounds(now)
    if now - month_start < min_elapsed:
        return ()
    limit = budget.monthly_limit_micros
    return tuple(
        percent
        for percent in budget.alert_percentages
        if projection.spent_micros * 100 < limit * percent <= projection.highest_micros * 100
    )
