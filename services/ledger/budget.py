"""Monthly budgets: validation, alert thresholds and the hard stop, as pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from libs.errors import InvalidArgument

MIN_ALERT_PERCENT = 1
MAX_ALERT_PERCENT = 1000


@dataclass(frozen=True)
class Budget:
    # 0 → no budget: nothing is refused and no alert fires.
    monthly_limit_micros: int
    # Sorted, without repeats.
    alert_percentages: tuple[int, ...]
    hard_stop: bool


@dataclass(frozen=True)
class BudgetStatus:
    allowed: bool
    spent_micros: int
    limit_micros: int
    alerts_crossed: tuple[int, ...]


def make_budget(
    monthly_limit_micros: int, alert_percentages: Sequence[int], hard_stop: bool, defaults: Sequence[int]
) -> Budget:
    if monthly_limit_micros < 0:
        raise InvalidArgument("monthly_limit_micros", "must not be negative")
    for i, percent in enumerate(alert_percentages):
        if not MIN_ALERT_PERCENT <= percent <= MAX_ALERT_PERCENT:
            raise InvalidArgument(
                f"alert_percentages[{i}]", f"must be between {MIN_ALERT_PERCENT} and {MAX_ALERT_PERCENT}"
            )
    return Budget(
        monthly_limit_micros=monthly_limit_micros,
        alert_percentages=tuple(sorted(set(alert_percentages or defaults))),
        hard_stop=hard_stop,
    )


def crossed_thresholds(spent_micros: int, budget: Budget | None) -> tuple[int, ...]:
    """The alert percentages that `spent_micros` has reached (exact integer comparison)."""
    if budget is None or budget.monthly_limit_micros == 0:
        return ()
    return tuple(
        percent
        for percent in budget.alert_percentages
        if spent_micros * 100 >= budget.monthly_limit_micros * percent
    )


def budget_status(spent_micros: int, budget: Budget | None) -> BudgetStatus:
    limit = budget.monthly_limit_micros if budget is not None else 0
    exhausted = limit > 0 and spent_micros >= limit
    return BudgetStatus(
        allowed=not (exhausted and budget is not None and budget.hard_stop),
        spent_micros=spent_micros,
        limit_micros=limit,
        alerts_crossed=crossed_thresholds(spent_micros, budget),
    )
