"""The CostLedger's behaviour, free of gRPC: record usage, budgets and alerts, usage reports."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from libs.pricing import Price, PriceTable
from services.ledger.budget import BudgetStatus, budget_status, crossed_thresholds, make_budget
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
    ) -> None:
        self._store = store
        self._prices = prices
        self._default_alert_percentages = tuple(default_alert_percentages)
        self._clock = clock

    def prices(self) -> list[Price]:
        return self._prices.prices()

    async def record_usage(self, event: UsageEvent) -> RecordOutcome:
        now = self._clock()
        validate_event(event, now)
        record = UsageRecord(
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
        )
        stored = await self._store.record(record)
        if not stored.duplicate:
            await self._alert_new_thresholds(
                record.tenant_id, month_key(record.occurred_at), stored.month_spend_micros
            )
        return RecordOutcome(cost_micros=stored.cost_micros, duplicate=stored.duplicate)

    async def _alert_new_thresholds(self, tenant_id: str, month: str, spent_micros: int) -> None:
        """Logs one WARNING per threshold the month's spend has reached, the first time it is seen."""
        budget = await self._store.get_budget(tenant_id)
        for percent in crossed_thresholds(spent_micros, budget):
            if await self._store.mark_alerted(tenant_id, month, percent):
                log.warning(
                    "budget alert: tenant %s reached %d%% of its monthly budget",
                    tenant_id,
                    percent,
                    extra={
                        "tenant_id": tenant_id,
                        "percent": percent,
                        "month": month,
                        "spent_micros": spent_micros,
                        "limit_micros": budget.monthly_limit_micros,
                    },
                )

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
