"""The ledger's durable state in Redis (run with appendonly, so an acknowledged record survives a restart).

Every key of a tenant carries the tenant id as its hash tag, so a tenant's keys share one Redis Cluster
slot and the record script can touch them all atomically:

    ledger:{T}:usage:<request_id>  hash    one usage record and its fingerprint; the idempotency marker
    ledger:{T}:usage-index         zset    request ids scored by occurred_at (µs since the epoch)
    ledger:{T}:spend:<YYYY-MM>     string  spend of the UTC month in micro-dollars
    ledger:{T}:spend-day:<YYYY-MM-DD>  string  spend of the UTC day (the recent trend of projections)
    ledger:{T}:budget              hash    monthly limit, alert percentages, hard stop
    ledger:{T}:alerted:<YYYY-MM>:<percent>  string  set once the month's alert has been logged
    ledger:{T}:projected:<YYYY-MM>:<percent>  string  set once the month's projection alert has been logged
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from libs.errors import ServiceError
from libs.redis_store import open_redis, run_script_calls, unavailable_when_redis_fails, wait_for_redis
from services.ledger.budget import Budget
from services.ledger.usage import Difficulty, UsageRecord, day_key, month_key

# Alert markers only need to outlive their month; day counters the longest trend window.
ALERT_MARKER_TTL_SECONDS = 62 * 24 * 3600
DAY_SPEND_TTL_SECONDS = 62 * 24 * 3600
REPORT_BATCH = 500

# Adds a usage record unless one with the same request id exists, in one atomic step, so concurrent
# retries of a request are counted exactly once. A request id is bound to the fingerprint of its record:
# the same id with an identical record is a duplicate (1), with a different one a conflict (2), never a
# merge. Records stored before fingerprints existed count as identical.
# KEYS: record hash, tenant index, month spend counter, day spend counter.
# ARGV: request id, index score, cost, fingerprint, day counter TTL, hash fields…
_RECORD_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local stored = redis.call('HGET', KEYS[1], 'fingerprint')
  if stored and stored ~= ARGV[4] then
    return {2, 0, 0}
  end
  return {1, redis.call('HGET', KEYS[1], 'cost_micros'), 0}
end
local fields = {'fingerprint', ARGV[4]}
for name, value in pairs(cjson.decode(ARGV[6])) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local spent = redis.call('INCRBY', KEYS[3], ARGV[3])
redis.call('INCRBY', KEYS[4], ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return {0, ARGV[3], spent}
"""
# Fields added after the first records were written: absent from older hashes, and left out of the
# fingerprint when empty so that a record replayed from an older journal still matches itself.
_LATER_FIELDS = ("task_type", "difficulty", "planned_model_id", "attempts", "prompt_fingerprint", "call_id")


class RecordConflict(ServiceError):
    """The request id is already recorded with different usage."""

    code = grpc.StatusCode.ALREADY_EXISTS


def record_fingerprint(record: UsageRecord) -> str:
    """What makes two records of one request id the same record. Not the time: a caller that leaves
    occurred_at to the ledger gets a new one on every retry."""
    document = [
        record.tenant_id,
        record.api_key_id,
        record.model_id,
        record.provider,
        record.input_tokens,
        record.output_tokens,
        record.cached,
    ]
    for name in _LATER_FIELDS:
        value = getattr(record, name)
        if value:
            document.append([name, value])
    return hashlib.sha256(json.dumps(document, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class StoredUsage:
    duplicate: bool
    # For a duplicate: the cost recorded the first time.
    cost_micros: int
    # Spend of the record's month after adding it (0 for a duplicate: nothing was added).
    month_spend_micros: int


def _stored(record: UsageRecord, verdict: list) -> StoredUsage | RecordConflict:
    outcome, cost, spent = verdict
    if outcome == 2:
        return RecordConflict(
            f"request_id: {record.request_id!r} is already recorded with different usage; "
            "record this usage under a request id of its own"
        )
    return StoredUsage(duplicate=outcome == 1, cost_micros=int(cost), month_spend_micros=int(spent))


def _micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(micros: int) -> datetime:
    return datetime.fromtimestamp(micros // 1_000_000, UTC).replace(microsecond=micros % 1_000_000)


def _key(tenant_id: str, *parts: str) -> str:
    return ":".join(("ledger", "{" + tenant_id + "}", *parts))


class LedgerStore:
    def __init__(self, url: str, timeout_seconds: float) -> None:
        self._url = url
        self._redis = open_redis(url, timeout_seconds=timeout_seconds)
        self._record_script = self._redis.register_script(_RECORD_SCRIPT)

    async def wait_until_reachable(self) -> None:
        await wait_for_redis(self._redis, self._url)

    async def close(self) -> None:
        await self._redis.aclose()

    async def record(self, record: UsageRecord) -> StoredUsage:
        (stored,) = await self.record_many([record])
        if isinstance(stored, RecordConflict):
            raise stored
        return stored

    async def record_many(self, records: list[UsageRecord]) -> list[StoredUsage | RecordConflict]:
        """Each record added unless its request id is already recorded, in one round trip to Redis (each
        record's step is atomic on its own); per record, what was stored or the conflict."""
        with unavailable_when_redis_fails("ledger storage (Redis)"):
            calls = [self._record_call(record) for record in records]
            verdicts = await run_script_calls(self._redis, self._record_script, calls)
        return [_stored(record, verdict) for record, verdict in zip(records, verdicts, strict=True)]

    def _record_call(self, record: UsageRecord) -> tuple[list[str], list]:
        tenant = record.tenant_id
        occurred = _micros(record.occurred_at)
        fields = {
            "tenant_id": tenant,
            "api_key_id": record.api_key_id,
            "model_id": record.model_id,
            "provider": record.provider,
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens,
            "cached": int(record.cached),
            "cost_micros": record.cost_micros,
            "occurred_at_us": occurred,
            "recorded_at_us": time.time_ns() // 1000,
            "task_type": record.task_type,
            "difficulty": record.difficulty.value,
            "planned_model_id": record.planned_model_id,
            "attempts": record.attempts,
            "prompt_fingerprint": record.prompt_fingerprint,
            "call_id": record.call_id,
        }
        keys = [
            _key(tenant, "usage", record.request_id),
            _key(tenant, "usage-index"),
            _key(tenant, "spend", month_key(record.occurred_at)),
            _key(tenant, "spend-day", day_key(record.occurred_at)),
        ]
        # The hash's fields as one JSON object of strings (decoded by the script): redis-py packing them
        # as thirty arguments was about a quarter of the ledger's main thread under load.
        args = [
            record.request_id,
            occurred,
            record.cost_micros,
            record_fingerprint(record),
            DAY_SPEND_TTL_SECONDS,
            json.dumps({name: str(value) for name, value in fields.items()}),
        ]
        return keys, args

    async def month_spend(self, tenant_id: str, month: str) -> int:
        with unavailable_when_redis_fails("ledger storage (Redis)"):
            return int(await self._redis.get(_key(tenant_id, "spend", month)) or 0)

    async def day_spends(self, tenant_id: str, days: list[str]) -> list[int]:
        """The spend of each UTC day in `days` ("YYYY-MM-DD"), 0 for days without usage."""
        if not days:
            return []
        with unavailable_when_redis_fails("ledger storage (Redis)"):
            values = await self._redis.mget([_key(tenant_id, "spend-day", day) for day in days])
        return [int(value or 0) for value in values]

    async def get_budget(self, tenant_id: str) -> Budget | None:
        with unavailable_when_redis_fails("ledger storage (Redis)"):
            fields = await self._redis.hgetall(_key(tenant_id, "budget"))
        if not fields:
            return None
        return Budget(
            monthly_limit_micros=int(fields["monthly_limit_micros"]),
            alert_percentages=tuple(int(p) for p in fields["alert_percentages"].split(",") if p),
            hard_stop=fields["hard_stop"] == "1",
        )

    async def set_budget(self, tenant_id: str, budget: Budget) -> None:
        with unavailable_when_redis_fails("ledger storage (Redis)"):
            await self._redis.hset(
                _key(tenant_id, "budget"),
                mapping={
                    "monthly_limit_micros": budget.monthly_limit_micros,
                    "alert_percentages": ",".join(str(p) for p in budget.alert_percentages),
                    "hard_stop": int(budget.hard_stop),
                },
            )

    async def mark_alerted(
        self, tenant_id: str, month: str, percent: int, *, projected: bool = False
    ) -> bool:
        """True only for the first caller per tenant, month and threshold (SET NX); spend alerts and
        projection alerts keep separate markers."""
        kind = "projected" if projected else "alerted"
        with unavailable_when_redis_fails("ledger storage (Redis)"):
            first = await self._redis.set(
                _key(tenant_id, kind, month, str(percent)), 1, nx=True, ex=ALERT_MARKER_TTL_SECONDS
            )
        return bool(first)

    async def records_between(
        self, tenant_id: str, start: datetime, end: datetime
    ) -> AsyncIterator[UsageRecord]:
        """The tenant's records with start <= occurred_at < end, fetched in pipelined batches."""
        with unavailable_when_redis_fails("ledger storage (Redis)"):
            # One read of the index: a snapshot that records arriving meanwhile cannot shift.
            request_ids = await self._redis.zrangebyscore(
                _key(tenant_id, "usage-index"), _micros(start), f"({_micros(end)}"
            )
        for offset in range(0, len(request_ids), REPORT_BATCH):
            batch = request_ids[offset : offset + REPORT_BATCH]
            with unavailable_when_redis_fails("ledger storage (Redis)"):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for request_id in batch:
                        pipe.hgetall(_key(tenant_id, "usage", request_id))
                    rows = await pipe.execute()
            for request_id, fields in zip(batch, rows, strict=True):
                if fields:
                    yield _record_from_hash(request_id, fields)


def _record_from_hash(request_id: str, fields: dict[str, str]) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant_id=fields["tenant_id"],
        api_key_id=fields["api_key_id"],
        model_id=fields["model_id"],
        provider=fields["provider"],
        input_tokens=int(fields["input_tokens"]),
        output_tokens=int(fields["output_tokens"]),
        cached=fields["cached"] == "1",
        cost_micros=int(fields["cost_micros"]),
        occurred_at=_from_micros(int(fields["occurred_at_us"])),
        task_type=fields.get("task_type", ""),
        difficulty=Difficulty(fields.get("difficulty", "")),
        planned_model_id=fields.get("planned_model_id", ""),
        attempts=int(fields.get("attempts", 0)),
        prompt_fingerprint=fields.get("prompt_fingerprint", ""),
        call_id=fields.get("call_id", ""),
    )
