"""LedgerService over gRPC: translates protos to the plain-Python Ledger and back."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.errors import InvalidArgument, ServiceError
from services.ledger.ledger import Ledger, RecordOutcome
from services.ledger.projection import Projection
from services.ledger.recommendations import Recommendation, RecommendationKind
from services.ledger.store import RecordConflict
from services.ledger.usage import Difficulty, GroupBy, UsageEvent, UsageRecord, UsageRow

GROUP_BY: dict[int, GroupBy] = {
    pb.GROUP_BY_UNSPECIFIED: "model",
    pb.GROUP_BY_MODEL: "model",
    pb.GROUP_BY_PROVIDER: "provider",
    pb.GROUP_BY_DAY: "day",
    pb.GROUP_BY_TASK_TYPE: "task_type",
    pb.GROUP_BY_DIFFICULTY: "difficulty",
}
DIFFICULTY: dict[int, Difficulty] = {
    pb.DIFFICULTY_UNSPECIFIED: Difficulty.UNSPECIFIED,
    pb.DIFFICULTY_SIMPLE: Difficulty.SIMPLE,
    pb.DIFFICULTY_COMPLEX: Difficulty.COMPLEX,
}
DIFFICULTY_PROTO = {difficulty: number for number, difficulty in DIFFICULTY.items()}
RECOMMENDATION_KIND = {
    RecommendationKind.CHEAPER_MODEL: pb.RECOMMENDATION_KIND_CHEAPER_MODEL,
    RecommendationKind.REPEATED_PROMPTS: pb.RECOMMENDATION_KIND_REPEATED_PROMPTS,
    RecommendationKind.BUDGET_PROJECTION: pb.RECOMMENDATION_KIND_BUDGET_PROJECTION,
    RecommendationKind.FREQUENT_FALLBACK: pb.RECOMMENDATION_KIND_FREQUENT_FALLBACK,
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


def _timestamp(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


# One call's records: a batch the Gateway fills while the previous one is on its way.
MAX_BATCH_RECORDS = 1000


def _event(request: pb.RecordUsageRequest) -> UsageEvent:
    return UsageEvent(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        api_key_id=request.api_key_id,
        model_id=request.model_id,
        provider=request.provider,
        input_tokens=request.input_tokens,
        output_tokens=request.output_tokens,
        cached=request.cached,
        occurred_at=_optional_time(request, "occurred_at"),
        task_type=request.task_type,
        difficulty=_difficulty(request.difficulty),
        planned_model_id=request.planned_model_id,
        attempts=request.attempts,
        prompt_fingerprint=request.prompt_fingerprint,
        call_id=request.call_id,
    )


def _result(index: int, outcome: RecordOutcome | ServiceError) -> pb.RecordResult:
    if isinstance(outcome, RecordConflict):
        return pb.RecordResult(status=pb.RECORD_STATUS_CONFLICT, error=outcome.message)
    if isinstance(outcome, ServiceError):
        return pb.RecordResult(status=pb.RECORD_STATUS_INVALID, error=f"records[{index}].{outcome.message}")
    status = pb.RECORD_STATUS_DUPLICATE if outcome.duplicate else pb.RECORD_STATUS_RECORDED
    return pb.RecordResult(status=status, cost_micros=outcome.cost_micros)


def _difficulty(number: int) -> Difficulty:
    try:
        return DIFFICULTY[number]
    except KeyError:
        raise InvalidArgument("difficulty", "must be a Difficulty value (0 to 2)") from None


def _evidence(record: UsageRecord) -> pb.UsageEvidence:
    return pb.UsageEvidence(
        request_id=record.request_id,
        model_id=record.model_id,
        occurred_at=_timestamp(record.occurred_at),
        cost_micros=record.cost_micros,
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
    )


def _projection(projection: Projection) -> pb.BudgetProjection:
    return pb.BudgetProjection(
        month=projection.month,
        spent_micros=projection.spent_micros,
        limit_micros=projection.limit_micros,
        linear_micros=projection.linear_micros,
        trend_micros=projection.trend_micros,
    )


def _recommendation(recommendation: Recommendation) -> pb.Recommendation:
    message = pb.Recommendation(
        kind=RECOMMENDATION_KIND[recommendation.kind],
        summary=recommendation.summary,
        estimated_monthly_saving_micros=recommendation.monthly_saving_micros,
        evidence_count=recommendation.evidence_count,
        evidence=[_evidence(record) for record in recommendation.evidence],
        model_id=recommendation.model_id,
        alternative_model_id=recommendation.alternative_model_id,
        task_type=recommendation.task_type,
        difficulty=DIFFICULTY_PROTO[recommendation.difficulty],
        requests=recommendation.requests,
    )
    if recommendation.projection is not None:
        message.projection.CopyFrom(_projection(recommendation.projection))
    return message


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
        outcome = await self._ledger.record_usage(_event(request))
        return pb.RecordUsageResponse(cost_micros=outcome.cost_micros, duplicate=outcome.duplicate)

    async def RecordUsages(self, request, context):
        if len(request.records) > MAX_BATCH_RECORDS:
            raise InvalidArgument("records", f"at most {MAX_BATCH_RECORDS} records per call")
        results: list[pb.RecordResult] = [pb.RecordResult() for _ in request.records]
        events: list[tuple[int, UsageEvent]] = []
        for index, record in enumerate(request.records):
            try:
                events.append((index, _event(record)))
            except InvalidArgument as invalid:
                results[index] = _result(index, invalid)
        outcomes = await self._ledger.record_usages([event for _, event in events]) if events else []
        for (index, _), outcome in zip(events, outcomes, strict=True):
            results[index] = _result(index, outcome)
        return pb.RecordUsagesResponse(results=results)

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
            raise InvalidArgument(
                "group_by",
                "must be GROUP_BY_MODEL, GROUP_BY_PROVIDER, GROUP_BY_DAY, GROUP_BY_TASK_TYPE or "
                "GROUP_BY_DIFFICULTY",
            )
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

    async def GetRecommendations(self, request, context):
        report = await self._ledger.recommendations(request.tenant_id)
        return pb.GetRecommendationsResponse(
            recommendations=[_recommendation(r) for r in report.recommendations],
            window_start=_timestamp(report.window_start),
            window_end=_timestamp(report.window_end),
            projection=_projection(report.projection),
        )
