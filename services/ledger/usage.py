"""Usage records and the pure rules around them: validation, UTC months, report ranges and grouping."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Literal

from libs.errors import InvalidArgument

GroupBy = Literal["model", "provider", "day", "task_type", "difficulty"]

MAX_ID_LENGTH = 128
MAX_MODEL_ID_LENGTH = 256
MAX_REPORT_RANGE = timedelta(days=400)
# Usage cannot predate the epoch; "a day from now" allows for clocks that disagree a little, while
# refusing records that would count toward a future month's budget.
EARLIEST_USAGE = datetime(1970, 1, 1, tzinfo=UTC)
MAX_CLOCK_SKEW = timedelta(days=1)
MAX_TASK_TYPE_LENGTH = 64
MAX_FINGERPRINT_LENGTH = 128
MAX_CALL_ID_LENGTH = 64
MAX_ATTEMPTS = 100
# The group key of records the Router did not classify (no task type or difficulty reported).
UNCLASSIFIED = "(unclassified)"


class Difficulty(StrEnum):
    """How hard the Router judged a request; UNSPECIFIED until the Router reports it."""

    UNSPECIFIED = ""
    SIMPLE = "simple"
    COMPLEX = "complex"


@dataclass(frozen=True)
class UsageEvent:
    """What a caller reports about one request."""

    request_id: str
    tenant_id: str
    model_id: str
    input_tokens: int
    output_tokens: int
    api_key_id: str = ""
    provider: str = ""
    cached: bool = False
    # None → the moment the ledger receives it.
    occurred_at: datetime | None = None
    task_type: str = ""
    difficulty: Difficulty = Difficulty.UNSPECIFIED
    planned_model_id: str = ""
    attempts: int = 0
    prompt_fingerprint: str = ""
    call_id: str = ""


@dataclass(frozen=True)
class UsageRecord:
    """One request as the ledger stores it."""

    request_id: str
    tenant_id: str
    api_key_id: str
    model_id: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached: bool
    cost_micros: int
    occurred_at: datetime
    task_type: str = ""
    difficulty: Difficulty = Difficulty.UNSPECIFIED
    # The model the plan put first (empty: not reported); differs from model_id after a fallback.
    planned_model_id: str = ""
    attempts: int = 0
    prompt_fingerprint: str = ""
    call_id: str = ""

    @property
    def fell_back(self) -> bool:
        return bool(self.planned_model_id) and self.planned_model_id != self.model_id


@dataclass
class UsageRow:
    key: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0

    def add(self, record: UsageRecord) -> None:
        self.requests += 1
        self.input_tokens += record.input_tokens
        self.output_tokens += record.output_tokens
        self.cost_micros += record.cost_micros


@dataclass(frozen=True)
class UsageReport:
    rows: list[UsageRow]
    total: UsageRow


def validate_tenant_id(tenant_id: str) -> None:
    if not tenant_id:
        raise InvalidArgument("tenant_id", "must not be empty")
    if len(tenant_id) > MAX_ID_LENGTH:
        raise InvalidArgument("tenant_id", f"must be at most {MAX_ID_LENGTH} characters")
    # The tenant id is the Redis hash tag of every key of the tenant; a brace would make keys ambiguous.
    if "{" in tenant_id or "}" in tenant_id:
        raise InvalidArgument("tenant_id", "must not contain '{' or '}'")


def validate_event(event: UsageEvent, now: datetime) -> None:
    if not event.request_id:
        raise InvalidArgument("request_id", "must not be empty")
    if len(event.request_id) > MAX_ID_LENGTH:
        raise InvalidArgument("request_id", f"must be at most {MAX_ID_LENGTH} characters")
    validate_tenant_id(event.tenant_id)
    if len(event.api_key_id) > MAX_ID_LENGTH:
        raise InvalidArgument("api_key_id", f"must be at most {MAX_ID_LENGTH} characters")
    if not event.model_id:
        raise InvalidArgument("model_id", "must not be empty")
    if len(event.model_id) > MAX_MODEL_ID_LENGTH:
        raise InvalidArgument("model_id", f"must be at most {MAX_MODEL_ID_LENGTH} characters")
    if len(event.provider) > MAX_ID_LENGTH:
        raise InvalidArgument("provider", f"must be at most {MAX_ID_LENGTH} characters")
    if event.input_tokens < 0:
        raise InvalidArgument("input_tokens", "must not be negative")
    if event.output_tokens < 0:
        raise InvalidArgument("output_tokens", "must not be negative")
    _validate_routing_context(event)
    if event.occurred_at is not None and not EARLIEST_USAGE <= event.occurred_at <= now + MAX_CLOCK_SKEW:
        raise InvalidArgument("occurred_at", "must lie between 1970-01-01 and one day from now")


def _validate_routing_context(event: UsageEvent) -> None:
    if len(event.task_type) > MAX_TASK_TYPE_LENGTH:
        raise InvalidArgument("task_type", f"must be at most {MAX_TASK_TYPE_LENGTH} characters")
    if len(event.planned_model_id) > MAX_MODEL_ID_LENGTH:
        raise InvalidArgument("planned_model_id", f"must be at most {MAX_MODEL_ID_LENGTH} characters")
    if not 0 <= event.attempts <= MAX_ATTEMPTS:
        raise InvalidArgument("attempts", f"must be between 0 and {MAX_ATTEMPTS}")
    if len(event.prompt_fingerprint) > MAX_FINGERPRINT_LENGTH:
        raise InvalidArgument("prompt_fingerprint", f"must be at most {MAX_FINGERPRINT_LENGTH} characters")
    if len(event.call_id) > MAX_CALL_ID_LENGTH:
        raise InvalidArgument("call_id", f"must be at most {MAX_CALL_ID_LENGTH} characters")


def month_key(moment: datetime) -> str:
    """The UTC calendar month of `moment`, e.g. "2024-03": budgets and spend counters are per month."""
    return moment.astimezone(UTC).strftime("%Y-%m")


def day_key(moment: datetime) -> str:
    """The UTC day of `moment`, e.g. "2024-03-01": the ledger also keeps a spend counter per day."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def month_bounds(moment: datetime) -> tuple[datetime, datetime]:
    """Start (inclusive) and end (exclusive) of the UTC month holding `moment`."""
    moment = moment.astimezone(UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    if moment.month == 12:
        return start, datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    return start, datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)


def report_range(start: datetime | None, end: datetime | None, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of a report; a missing bound is the matching bound of the current UTC month."""
    month_start, month_end = month_bounds(now)
    start = month_start if start is None else start
    end = month_end if end is None else end
    if start >= end:
        raise InvalidArgument("start_time", "must be before end_time")
    if end - start > MAX_REPORT_RANGE:
        raise InvalidArgument("end_time", f"the range must span at most {MAX_REPORT_RANGE.days} days")
    return start, end


def group_key(record: UsageRecord, group_by: GroupBy) -> str:
    if group_by == "model":
        return record.model_id
    if group_by == "provider":
        return record.provider
    if group_by == "task_type":
        return record.task_type or UNCLASSIFIED
    if group_by == "difficulty":
        return record.difficulty.value or UNCLASSIFIED
    return day_key(record.occurred_at)


class UsageSummary:
    """Accumulates records one at a time, so a long report never holds all its records in memory."""

    def __init__(self, group_by: GroupBy) -> None:
        self._group_by = group_by
        self._rows: dict[str, UsageRow] = {}
        self._total = UsageRow(key="total")

    def add(self, record: UsageRecord) -> None:
        key = group_key(record, self._group_by)
        self._rows.setdefault(key, UsageRow(key=key)).add(record)
        self._total.add(record)

    def report(self) -> UsageReport:
        """One row per group key, sorted by key, plus the total over every record."""
        return UsageReport(rows=[self._rows[key] for key in sorted(self._rows)], total=self._total)
