"""The CostLedger's behaviour, free of gRPC: record usage, budgets and alerts, usage reports."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from opentelemetry import metrics

from libs.errors import InvalidArgument, ServiceError
from libs.pricing import Price, PriceTable
from services.ledger.budget import Budget, BudgetStatus, budget_status, crossed_thresholds, make_budget
from services.ledger.projection import Projection, project, projected_thresholds, trend_days
from services.ledger.recommendations import RecommendationReport, RecommendationSettings, UsageAnalysis
from services.ledger.store import LedgerStore
from services.ledger.usage import (
    GroupBy,
    UsageEvent,
    UsageRecord,
    UsageReport,
    UsageSummary,
    month_key,
    report_range,
    validate_event,
    validate_tenant_id,
)

log = logging.getLogger(__name__)
_projection_alerts = metrics.get_meter("sophia.ledger").create_counter(
    "sophia.ledger.budget.projection_alerts",
    description="Month-end spend projections that reached a budget alert percentage (once per month each)",
)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RecordOutcome:
    cost_micros: int
    duplicate: bool


class Ledger:
    def __init__(
        self,
        store: LedgerStore,
        prices: PriceTable,
        default_alert_percentages: Sequence[int],
        clock: Callable[[], datetime] = utc_now,
        *,
        advice: RecommendationSettings | None = None,
        projection_min_elapsed: timedelta = timedelta(hours=24),
    ) -> None:
        self._store = store
        self._prices = prices
        self._default_alert_percentages = tuple(default_alert_percentages)
        self._clock = clock
        self._advice = advice or RecommendationSettings()
        self._projection_min_elapsed = projection_min_elapsed

    def prices(self) -> list[Price]:
        return self._prices.prices()

    async def record_usage(self, event: UsageEvent) -> RecordOutcome:
        (outcome,) = await self.record_usages([event])
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    async def record_usages(self, events: Sequence[UsageEvent]) -> list[RecordOutcome | ServiceError]:
        """Each event validated, priced and stored (one round trip for them all); per event, the outcome
        or the error that refused it (InvalidArgument, RecordConflict). Budget alerts follow, once per
        tenant."""
        now = self._clock()
        outcomes: list[RecordOutcome | ServiceError | None] = [None] * len(events)
        records: list[tuple[int, UsageRecord]] = []
        for index, event in enumerate(events):
            try:
                validate_event(event, now)
            except InvalidArgument as invalid:
                outcomes[index] = invalid
                continue
            records.append((index, self._record_of(event, now)))
        stored = await self._store.record_many([record for _, record in records])
        spent_by_tenant: dict[tuple[str, str], tuple[datetime, int]] = {}
        for (index, record), result in zip(records, stored, strict=True):
            if isinstance(result, ServiceError):
                outcomes[index] = result
                continue
            outcomes[index] = RecordOutcome(cost_micros=result.cost_micros, duplicate=result.duplicate)
            if not result.duplicate:
                month = (record.tenant_id, month_key(record.occurred_at))
                seen = spent_by_tenant.get(month)
                if seen is None or result.month_spend_micros > seen[1]:
                    spent_by_tenant[month] = (record.occurred_at, result.month_spend_micros)
        for (tenant_id, _), (occurred_at, spent) in spent_by_tenant.items():
            await self._alert_new_thresholds(tenant_id, occurred_at, spent, now)
        return [outcome for outcome in outcomes if outcome is not None]

    def _record_of(self, event: UsageEvent, now: datetime) -> UsageRecord:
        return UsageRecord(
            request_id=event.request_id,
            tenant_id=event.tenant_id,
            api_key_id=event.api_key_id,
            model_id=event.model_id,
            provider=event.provider,
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
            cached=event.cached,
            cost_micros=self._prices.cost_micros(
                event.model_id, event.input_tokens, event.output_tokens, cached=event.cached
            ),
            occurred_at=event.occurred_at or now,
            task_type=event.task_type,
            difficulty=event.difficulty,
            planned_model_id=event.planned_model_id,
            attempts=event.attempts,
            prompt_fingerprint=event.prompt_fingerprint,
            call_id=event.call_id,
        )

    async def _alert_new_thresholds(
        self, tenant_id: str, occurred_at: datetime, spent_micros: int, now: datetime
    ) -> None:
        """Logs one WARNING per threshold the month's spend has reached, the first time it is seen, and
        one per threshold its month-end projection reaches first (current month only)."""
        budget = await self._store.get_budget(tenant_id)
        if budget is None or budget.monthly_limit_micros == 0:
            return
        month = month_key(occurred_at)
        for percent in crossed_thresholds(spent_micros, budget):
            if await self._store.mark_alerted(tenant_id, month, percent):
                log.warning(
                    "budget alert: tenant %s reached %d%% of its monthly budget",
                    tenant_id,
                    percent,
                    extra={
                        "tenant_id": tenant_id,
                        "alert": "spent",
                        "percent": percent,
                        "month": month,
                        "spent_micros": spent_micros,
                        "limit_micros": budget.monthly_limit_micros,
                    },
                )
        if month == month_key(now):
            await self._alert_projection(tenant_id, budget, spent_micros, now)

    async def _alert_projection(
        self, tenant_id: str, budget: Budget, spent_micros: int, now: datetime
    ) -> None:
        projection = await self._projection(tenant_id, budget, spent_micros, now)
        for percent in projected_thresholds(projection, budget, now, self._projection_min_elapsed):
            if await self._store.mark_alerted(tenant_id, projection.month, percent, projected=True):
                _projection_alerts.add(1, {"percent": percent})
                log.warning(
                    "budget projection alert: tenant %s is projected to reach %d%% of its monthly budget "
                    "by the end of %s",
                    tenant_id,
                    percent,
                    projection.month,
                    extra={
                        "tenant_id": tenant_id,
                        "alert": "projected",
                        "percent": percent,
                        "month": projection.month,
                        "spent_micros": spent_micros,
                        "limit_micros": budget.monthly_limit_micros,
                        "linear_micros": projection.linear_micros,
                        "trend_micros": projection.trend_micros,
                    },
                )

    async def _projection(
        self, tenant_id: str, budget: Budget | None, spent_micros: int, now: datetime
    ) -> Projection:
        recent = sum(await self._store.day_spends(tenant_id, trend_days(now)))
        limit = budget.monthly_limit_micros if budget is not None else 0
        return project(now, spent_micros, recent, limit)

    async def set_budget(
        self, tenant_id: str, monthly_limit_micros: int, alert_percentages: Sequence[int], hard_stop: bool
    ) -> None:
        validate_tenant_id(tenant_id)
        budget = make_budget(
            monthly_limit_micros, alert_percentages, hard_stop, self._default_alert_percentages
        )
        await self._store.set_budget(tenant_id, budget)

    async def check_budget(self, tenant_id: str) -> BudgetStatus:
        validate_tenant_id(tenant_id)
        budget = await self._store.get_budget(tenant_id)
        spent = await self._store.month_spend(tenant_id, month_key(self._clock()))
        return budget_status(spent, budget)

    async def usage_report(
        self, tenant_id: str, start: datetime | None, end: datetime | None, group_by: GroupBy
    ) -> UsageReport:
        validate_tenant_id(tenant_id)
        start, end = report_range(start, end, self._clock())
        summary = UsageSummary(group_by)
        async for record in self._store.records_between(tenant_id, start, end):
            summary.add(record)
        return summary.report()

    async def recommendations(self, tenant_id: str) -> RecommendationReport:
        validate_tenant_id(tenant_id)
        now = self._clock()
        budget = await self._store.get_budget(tenant_id)
        spent = await self._store.month_spend(tenant_id, month_key(now))
        projection = await self._projection(tenant_id, budget, spent, now)
        analysis = UsageAnalysis(self._prices, self._advice, now)
        async for record in self._store.records_between(tenant_id, analysis.scan_start, now):
            analysis.add(record)
        return RecommendationReport(
            recommendations=analysis.recommendations(projection),
            window_start=analysis.window_start,
            window_end=analysis.window_end,
            projection=projection,
        )
