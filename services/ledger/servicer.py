"""LedgerService over gRPC: translates protos to the plain-Python Ledger and back."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.errors import InvalidArgument
from services.ledger.ledger import Ledger
from services.ledger.usage import GroupBy, UsageEvent, UsageRow

GROUP_BY: dict[int, GroupBy] = {
    pb.GROUP_BY_UNSPECIFIED: "model",
    pb.GROUP_BY_MODEL: "model",
    pb.GROUP_BY_PROVIDER: "provider",
    pb.GROUP_BY_DAY: "day",
}
# 0001-01-01 … 9999-12-31, the span datetime can hold; anything else is a malformed timestamp.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def _optional_time(message, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    timestamp: Timestamp = getattr(message, field)
    if not MIN_TIMESTAMP_SECONDS <= timestamp.seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidArgument(field, "is outside the years 1 to 9999")
    if not 0 <= timestamp.nanos < 1_000_000_000:
        raise InvalidArgument(field, "nanos must be between 0 and 999999999")
    return timestamp.ToDatetime(tzinfo=UTC)


def _row(row: UsageRow) -> pb.UsageRow:
    return pb.UsageRow(
        key=row.key,
        requests=row.requests,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cost_micros=row.cost_micros,
    )


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def RecordUsage(self, request, context):
        outcome = await self._ledger.record_usage(
            UsageEvent(
                request_id=request.request_id,
                tenant_id=request.tenant_id,
                api_key_id=request.api_key_id,
                model_id=request.model_id,
                provider=request.provider,
                input_tokens=request.input_tokens,
                output_tokens=request.output_tokens,
                cached=request.cached,
                occurred_at=_optional_time(request, "occurred_at"),
            )
        )
        return pb.RecordUsageResponse(cost_micros=outcome.cost_micros, duplicate=outcome.duplicate)

    async def CheckBudget(self, request, context):
        status = await self._ledger.check_budget(request.tenant_id)
        return pb.CheckBudgetResponse(
            allowed=status.allowed,
            spent_micros=status.spent_micros,
            limit_micros=status.limit_micros,
            alerts_crossed=status.alerts_crossed,
        )

    async def SetBudget(self, request, context):
        await self._ledger.set_budget(
            request.tenant_id,
            request.monthly_limit_micros,
            list(request.alert_percentages),
            request.hard_stop,
        )
        return pb.SetBudgetResponse()

    async def GetUsageReport(self, request, context):
        group_by = GROUP_BY.get(request.group_by)
        if group_by is None:
            raise InvalidArgument("group_by", "must be GROUP_BY_MODEL, GROUP_BY_PROVIDER or GROUP_BY_DAY")
        report = await self._ledger.usage_report(
            request.tenant_id,
            _optional_time(request, "start_time"),
            _optional_time(request, "end_time"),
            group_by,
        )
        return pb.GetUsageReportResponse(rows=[_row(row) for row in report.rows], total=_row(report.total))

    async def ListPrices(self, request, context):
        return pb.ListPricesResponse(
            prices=[
                pb.Price(
                    model_id=price.model_id,
                    input_micros_per_mtok=price.input_micros_per_mtok,
                    output_micros_per_mtok=price.output_micros_per_mtok,
                )
                for price in self._ledger.prices()
            ]
        )
