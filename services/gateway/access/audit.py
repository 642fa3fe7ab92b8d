"""The audit log: every control-plane action, and every refused attempt at one, in a Redis stream.

An entry says who (the admin key's id — never a secret; for a key that did not authenticate, the first
characters of its SHA-256 digest), when, what (the action), on what (tenant, target), with what outcome and
under which request id. Entries are kept up to `auth.audit.max_entries` and `auth.audit.retention_days`,
whichever is fewer, and read newest first with filters and paging (the page token is a stream id).

Usage stays in the ledger: this log is for the control plane. An entry that cannot be written (Redis
down) is logged as an ERROR with the same fields, so it is never silently lost.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import asdict, dataclass

import redis.asyncio as redis

from libs.config import AuditConfig
from libs.errors import InvalidArgument, Unavailable
from libs.redis_store import unavailable_when_redis_fails

log = logging.getLogger(__name__)

STREAM = "gateway:audit:log"
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 100
# Entries read per XREVRANGE step while filtering.
_SCAN_STEP = 1000


class AuditOutcome(enum.StrEnum):
    OK = "ok"
    DENIED = "denied"  # the caller may not (bad key, wrong role, outside its tenants)
    FAILED = "failed"  # allowed, but it did not happen (bad input, a dependency down)


@dataclass(frozen=True)
class AuditEntry:
    at: float  # Unix seconds
    actor: str  # admin key id, or "digest:<12 hex>" for a key that did not authenticate
    role: str  # the actor's role, "" when unknown
    action: str  # e.g. "create_key", "rotate_key", "set_budget"
    tenant_id: str  # the tenant acted on, "" for none
    target: str  # e.g. the key id acted on
    outcome: AuditOutcome
    request_id: str
    detail: str = ""  # the refusal's or failure's message; never a secret
    entry_id: str = ""  # the stream id, set when read back


@dataclass(frozen=True)
class AuditQuery:
    action: str = ""
    actor: str = ""
    tenant_id: str = ""
    outcome: AuditOutcome | None = None
    since: float = 0.0
    until: float = 0.0  # 0: now
    page_size: int = DEFAULT_PAGE_SIZE
    page_token: str = ""  # "": the newest entry

    def __post_init__(self) -> None:
        if not 0 < self.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        if self.page_token and not _is_stream_id(self.page_token):
            raise InvalidArgument("page_token", "not a token from an earlier page")
        if self.until and self.since > self.until:
            raise InvalidArgument("since", "must not be after until")

    def matches(self, entry: AuditEntry) -> bool:
        return (
            (not self.action or entry.action == self.action)
            and (not self.actor or entry.actor == self.actor)
            and (not self.tenant_id or entry.tenant_id == self.tenant_id)
            and (self.outcome is None or entry.outcome is self.outcome)
        )


def _is_stream_id(token: str) -> bool:
    millis, dash, sequence = token.partition("-")
    return bool(dash) and millis.isdigit() and sequence.isdigit() and len(token) <= 40


def _before(stream_id: str) -> str:
    """The largest stream id below `stream_id` (XREVRANGE's bounds are inclusive)."""
    millis, _, sequence = stream_id.partition("-")
    if int(sequence) > 0:
        return f"{millis}-{int(sequence) - 1}"
    return f"{int(millis) - 1}-18446744073709551615" if int(millis) > 0 else "0-0"


class AuditLog:
    def __init__(self, client: redis.Redis, config: AuditConfig) -> None:
        self._redis = client
        self._config = config

    async def record(self, entry: AuditEntry) -> None:
        fields = {k: str(v) for k, v in asdict(entry).items() if k != "entry_id"}
        min_id = int((time.time() - self._config.retention_days * 86400) * 1000)
        try:
            with unavailable_when_redis_fails("audit log"):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.xadd(STREAM, fields, maxlen=self._config.max_entries, approximate=True)
                    pipe.xtrim(STREAM, minid=min_id, approximate=True)
                    await pipe.execute()
        except Unavailable:
            log.error("audit entry not stored (Redis unavailable): %s", fields)

    async def read(self, query: AuditQuery) -> tuple[list[AuditEntry], str]:
        """Matching entries newest first, and the token of the next page ("" when there is none)."""
        upper = query.page_token and _before(query.page_token)
        upper = upper or (f"{int(query.until * 1000)}-18446744073709551615" if query.until else "+")
        lower = f"{int(query.since * 1000)}-0" if query.since else "-"
        found: list[AuditEntry] = []
        with unavailable_when_redis_fails("audit log"):
            while len(found) < query.page_size and upper != "0-0":
                batch = await self._redis.xrevrange(STREAM, max=upper, min=lower, count=_SCAN_STEP)
                if not batch:
                    return found, ""
                for stream_id, fields in batch:
                    entry = _entry(stream_id, fields)
                    if query.matches(entry):
                        found.append(entry)
                        if len(found) == query.page_size:
                            return found, entry.entry_id
                upper = _before(batch[-1][0])
        return found, ""


def _entry(stream_id: str, fields: dict[str, str]) -> AuditEntry:
    return AuditEntry(
        at=float(fields.get("at", 0)),
        actor=fields.get("actor", ""),
        role=fields.get("role", ""),
        action=fields.get("action", ""),
        tenant_id=fields.get("tenant_id", ""),
        target=fields.get("target", ""),
        outcome=AuditOutcome(fields.get("outcome", AuditOutcome.FAILED.value)),
        request_id=fields.get("request_id", ""),
        detail=fields.get("detail", ""),
        entry_id=stream_id,
    )
