"""Usage records for the CostLedger, never lost and never counted twice.

Write-ahead: a record is in the journal (journal.py, fsync'ed) before the ledger is asked, and the
request's answer waits for that, not for the ledger. The ledger is then asked off the response path;
what it acknowledges is marked in the journal, and what it has not is sent again after a restart and
periodically while it is down (the breaker logs one WARNING per outage and one INFO on recovery).

The ledger binds a request id to its record: a resend of the same record is a duplicate (nothing added),
a different record under a request id already used is ALREADY_EXISTS. Such a record is still counted,
under an id derived from its journal entry (the same on every resend, so it too is counted once).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
from dataclasses import asdict, dataclass, replace

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs import deadline
from libs.breaker import UNREACHABLE, DependencyBreaker
from services.gateway.usage.journal import JournalEntry, UsageJournal

log = logging.getLogger(__name__)

RECORD_TIMEOUT_SECONDS = 2.0
# Records sent at once by a replay; a backlog of thousands drains in batches instead of all at once.
REPLAY_CONCURRENCY = 16
# The ledger's request ids are at most 128 characters; a derived id keeps a readable prefix of the original.
MAX_REQUEST_ID_CHARS = 128
DERIVED_SUFFIX_CHARS = 20


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    tenant_id: str
    api_key_id: str
    model_id: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached: bool
    occurred_at: float  # Unix seconds

    def to_proto(self) -> pb.RecordUsageRequest:
        occurred = Timestamp()
        occurred.FromNanoseconds(int(self.occurred_at * 1e9))
        return pb.RecordUsageRequest(
            request_id=self.request_id,
            tenant_id=self.tenant_id,
            api_key_id=self.api_key_id,
            model_id=self.model_id,
            provider=self.provider,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached=self.cached,
            occurred_at=occurred,
        )


def derived_request_id(request_id: str, unique: str) -> str:
    """A request id of its own for a record that may not use `request_id`, the same for the same `unique`."""
    digest = hashlib.sha256(f"{request_id}\n{unique}".encode()).hexdigest()[: DERIVED_SUFFIX_CHARS - 1]
    return f"{request_id[: MAX_REQUEST_ID_CHARS - DERIVED_SUFFIX_CHARS]}~{digest}"


class UsageRecorder:
    def __init__(
        self,
        stub: ledger_pb2_grpc.LedgerServiceStub,
        journal: UsageJournal,
        replay_seconds: float,
        breaker: DependencyBreaker,
    ) -> None:
        self._stub = stub
        self._journal = journal
        self._replay_seconds = replay_seconds
        self._breaker = breaker
        self._unacked: dict[str, JournalEntry] = {}  # in journal order
        self._sending: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._replay: asyncio.Task | None = None

    async def start(self) -> None:
        """Takes up what an earlier run left unacknowledged, and replays from now on."""
        recovered = await asyncio.to_thread(self._journal.recover)
        for entry in recovered:
            self._unacked[entry.entry_id] = entry
        if recovered:
            log.info("%d usage records from an earlier run wait for the ledger", len(recovered))
        self._replay = asyncio.create_task(self._replay_forever())

    async def record(self, record: UsageRecord) -> None:
        """Returns once the record is durable; the ledger is asked in the background."""
        try:
            entry = await self._journal.append(asdict(record))
        except OSError as exc:
            # No durable copy: the ledger itself is the only place left, so the answer waits for it.
            log.error("usage journal not writable (%s): sending the record to the ledger directly", exc)
            await self._send(record, unique=record.request_id)
            return
        self._unacked[entry.entry_id] = entry
        if self._breaker.allows():
            self._spawn(self._deliver(entry))

    def _spawn(self, work) -> None:
        # The delivery outlives the request: it keeps the request id for its logs but not the request's
        # deadline, which would fail the ledger call the moment a client's deadline passed.
        context = contextvars.copy_context()
        context.run(deadline.start, None)
        task = asyncio.get_running_loop().create_task(work, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, entry: JournalEntry) -> None:
        if entry.entry_id in self._sending:
            return
        self._sending.add(entry.entry_id)
        try:
            if await self._send(UsageRecord(**entry.record), unique=entry.entry_id):
                self._journal.ack(entry.entry_id)
                self._unacked.pop(entry.entry_id, None)
        finally:
            self._sending.discard(entry.entry_id)

    async def _send(self, record: UsageRecord, *, unique: str) -> bool:
        """True when the ledger holds the record (now or from an earlier attempt), or refused it for good."""
        try:
            await self._stub.RecordUsage(record.to_proto(), timeout=RECORD_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.ALREADY_EXISTS:
                # Another request holds this id in the ledger; this one is still counted, under its own id.
                derived = derived_request_id(record.request_id, unique)
                log.warning(
                    "request id %s already recorded with other usage; recording as %s",
                    record.request_id,
                    derived,
                )
                return await self._send(replace(record, request_id=derived), unique=unique)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                log.error("ledger rejected usage record: %s", exc.details(), extra={"record": asdict(record)})
                return True
            if code in UNREACHABLE:
                self._breaker.record_failure(code.name)
            return False
        return True

    async def replay_once(self) -> int:
        """Sends unacknowledged records oldest first while the ledger takes them; returns how many it took."""
        waiting = [entry for entry in self._unacked.values() if entry.entry_id not in self._sending]
        delivered = 0
        for offset in range(0, len(waiting), REPLAY_CONCURRENCY):
            if not self._breaker.allows():
                break
            batch = waiting[offset : offset + REPLAY_CONCURRENCY]
            await asyncio.gather(*(self._deliver(entry) for entry in batch))
            delivered += sum(1 for entry in batch if entry.entry_id not in self._unacked)
        if delivered:
            log.info("replayed %d usage records to the ledger", delivered)
        return delivered

    async def _replay_forever(self) -> None:
        while True:
            await asyncio.sleep(self._replay_seconds)
            try:
                await self.replay_once()
            except Exception:
                log.exception("usage replay failed; retrying later")

    def pending(self) -> int:
        return len(self._unacked)

    async def close(self, within_seconds: float) -> None:
        """Stops replaying, gives records on their way a moment, and closes the journal. Whatever the
        ledger has not acknowledged stays in the journal for the next start."""
        if self._replay is not None:
            self._replay.cancel()
            await asyncio.gather(self._replay, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within_seconds)
        await self._breaker.aclose()
        await self._journal.close()
