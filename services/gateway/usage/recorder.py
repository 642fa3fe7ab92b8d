"""Usage records for the CostLedger, never lost and never counted twice.

Write-ahead: a record is in the journal (journal.py, synced to disk) before the ledger is asked, and the
request's answer waits for that, not for the ledger (for a call alone in flight, for its stand-in: see
`stand_in_now`). The ledger is then asked off the response path, in
batches (RecordUsages): a batch goes `gather_seconds` after its first record (at once when it is full),
so a busy Gateway makes one ledger call for many requests; the ledger learns of a record that much later,
never the client. What the ledger acknowledges is marked in the journal; what it has not is sent again
after a restart and periodically while it is down (the breaker logs one WARNING per outage and one INFO
on recovery).

The ledger binds a request id to its record: a resend of the same record is a duplicate (nothing added),
a different record under a request id already used is a conflict. Such a record is still counted, under
an id derived from its journal entry (the same on every resend, so it too is counted once).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import metrics
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs import deadline
from libs.breaker import SETTLE_SECONDS, UNREACHABLE, DependencyBreaker, grpc_health_probe
from services.gateway.usage.journal import JournalEntry, UsageJournal

log = logging.getLogger(__name__)
_meter = metrics.get_meter("sophia.gateway")

LEDGER_SERVICE = "sophia.ledger.v1.LedgerService"
RECORD_TIMEOUT_SECONDS = 2.0
# How long a batch waits for more records after its first: at 500 requests/s, fifty per call instead of
# the three or four that arrive during one call. Each call is a Redis pipeline the ledger syncs to disk;
# at 20 ms, under `make bench` at one connection, the ledger spent twice the CPU per request and those
# syncs queued beside the usage journal's on this machine's one disk (four interleaved runs: 1.96 / 2.15 /
# 1.71 / 1.78 ms added at p50 with 20 ms, 1.55 / 1.90 / 1.71 / 1.62 with 100 ms). The ledger learns of
# a record that much later (budgets are checked at most once a second anyway).
GATHER_SECONDS = 0.1
# Records per RecordUsages call (the ledger takes up to 1000).
MAX_BATCH = 256
# Records held in memory while the ledger does not take them (about 1 KB each); past this, whole journal
# segments are parked on disk and read back as the ledger takes what is held (journal.py).
HOLD_RECORDS = 50_000
_DIFFICULTIES = {"simple": pb.DIFFICULTY_SIMPLE, "complex": pb.DIFFICULTY_COMPLEX}
# The ledger's request ids are at most 128 characters; a derived id keeps a readable prefix of the original.
MAX_REQUEST_ID_CHARS = 128
DERIVED_SUFFIX_CHARS = 20


def ledger_breaker(channel: grpc.aio.Channel) -> DependencyBreaker:
    """The breaker over the ledger for usage records; its one WARNING per outage says where they wait.

    The ledger answers health checks while its own Redis hangs, so the probe may close the breaker while
    real calls still fail, each only at its timeout. An outage ends with a delivered batch, or after the
    breaker stayed closed for longer than a call may take: a call let through right after the probe
    fails before the outage could be declared over, and the outage stays one (one WARNING, one INFO)."""
    return DependencyBreaker(
        "ledger (usage records spooled to the outbox)",
        grpc_health_probe(channel, LEDGER_SERVICE),
        settle_seconds=RECORD_TIMEOUT_SECONDS + SETTLE_SECONDS,
    )


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
    # The routing context, for the ledger's advice: what the Router made of the request, the model it put
    # first, the targets tried, and a digest of what determines the answer (never the prompt itself).
    task_type: str = ""
    difficulty: str = ""  # "simple" | "complex" | ""
    planned_model_id: str = ""
    attempts: int = 0
    prompt_fingerprint: str = ""
    # This call's own name for the ledger, set by the recorder: its journal entry's id, the same on every
    # resend. Empty in records journaled before it existed (the ledger then compares them as before).
    call_id: str = ""

    @classmethod
    def from_json(cls, document: dict) -> UsageRecord:
        """A journaled record; fields this version does not know (written by a newer one) are left out, so
        that one such record cannot stop the replay of every other."""
        known = {name: value for name, value in document.items() if name in _RECORD_FIELDS}
        return cls(**known)

    def as_json(self) -> dict:
        """The record as the journal keeps it (every field is a plain value: no deep copy needed)."""
        return dict(vars(self))

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
            task_type=self.task_type,
            difficulty=_DIFFICULTIES.get(self.difficulty, pb.DIFFICULTY_UNSPECIFIED),
            planned_model_id=self.planned_model_id,
            attempts=self.attempts,
            prompt_fingerprint=self.prompt_fingerprint,
            call_id=self.call_id,
        )


_RECORD_FIELDS = frozenset(field.name for field in fields(UsageRecord))


def new_call_id() -> str:
    """A call's id: its record's journal entry, and its name for the ledger (see `UsageRecord.call_id`)."""
    return uuid.uuid4().hex


def _document(record: UsageRecord, call_id: str) -> dict:
    document = record.as_json()
    document["call_id"] = call_id
    return document


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
        *,
        gather_seconds: float = GATHER_SECONDS,
        hold_records: int = HOLD_RECORDS,
    ) -> None:
        self._stub = stub
        self._gather_seconds = gather_seconds
        self._hold_records = hold_records
        self._journal = journal
        self._replay_seconds = replay_seconds
        self._breaker = breaker
        self._unacked: dict[str, JournalEntry] = {}  # in journal order
        self._queued: dict[str, JournalEntry] = {}  # waiting for the next batch, in order
        self._sending: set[str] = set()
        # Entries whose request id the ledger holds with other usage: sent under a derived id.
        self._conflicted: set[str] = set()
        self._sender: asyncio.Task | None = None
        self._replay: asyncio.Task | None = None
        _meter.create_observable_gauge(
            "sophia.gateway.usage.pending",
            callbacks=[lambda _options: [metrics.Observation(self.pending())]],
            unit="{record}",
            description="Usage records journaled but not yet acknowledged by the ledger",
        )

    async def start(self) -> None:
        """Takes up what an earlier run left unacknowledged, and replays from now on."""
        recovered = await asyncio.to_thread(self._journal.recover, self._hold_records)
        self._hold(recovered)
        if recovered or self._journal.parked():
            log.info(
                "%d usage records from an earlier run wait for the ledger",
                len(recovered) + self._journal.parked(),
            )
        self._replay = asyncio.create_task(self._replay_forever())

    def _hold(self, entries: list[JournalEntry]) -> None:
        """Journal entries read back (at start, or from a parked segment) wait for the ledger again."""
        for entry in entries:
            try:
                UsageRecord.from_json(entry.record).to_proto()
            except (TypeError, ValueError) as exc:
                # Not one this Gateway wrote (fields missing or of the wrong kind): left in the journal for
                # an operator, rather than failing every batch it would join.
                log.error("usage journal entry %s unreadable (%s): left in the journal", entry.entry_id, exc)
                continue
            self._unacked[entry.entry_id] = entry

    async def stand_in(self, record: UsageRecord, call_id: str) -> None:
        """Journals `record` for a call still under way (a stream, before its first chunk goes out): never
        sent to the ledger from this run, but replayed after a restart if the process ends before
        `record(..., call_id)` replaces it."""
        try:
            await self._journal.append(_document(record, call_id), entry_id=call_id, stand_in=True)
        except OSError as exc:
            log.error("usage journal not writable (%s): a stream goes on without its stand-in record", exc)

    def stand_in_now(self, call_id: str, record: Callable[[], UsageRecord]) -> bool:
        """Journals `record()` for a call whose request has just gone to its provider, synced at once, when
        the Gateway has nothing else in flight: the sync runs while the provider works, and the call's own
        record, written over it (`record(..., over_stand_in=True)`), need not wait for one. False when not
        written (with others in flight the record's own synced write is shared with theirs)."""
        try:
            return self._journal.stand_in_now(call_id, lambda: _document(record(), call_id))
        except OSError as exc:
            log.error("usage journal not writable (%s): a call goes on without its stand-in record", exc)
            return False

    def withdraw(self, call_id: str) -> None:
        """The call whose stand-in `stand_in_now` wrote ended with nothing to bill (no provider answered)."""
        try:
            self._journal.withdraw(call_id)
        except OSError as exc:
            log.error("usage journal: stand-in %s not withdrawn (%s); a restart may bill it", call_id, exc)

    async def record(
        self, record: UsageRecord, call_id: str | None = None, *, over_stand_in: bool = False
    ) -> None:
        """Returns once the record is durable (`over_stand_in`: once it is written over the call's durable
        stand-in, synced soon after); the ledger is asked in the background, once it is durable. The record
        is handed on (kept until the ledger holds it) even when the caller is cancelled while it is written.
        `call_id`: the one given to `stand_in` or `stand_in_now`, whose stand-in this record replaces."""
        # One id names the journal entry and, for the ledger, this call: stable across resends, and
        # different from any other call's, so a reused request id never merges two calls into one record.
        call_id = call_id or new_call_id()
        document = _document(record, call_id)
        if over_stand_in:
            try:
                self._journal.write_over_stand_in(document, self._track, entry_id=call_id)
                return
            except OSError as exc:
                log.error("usage journal: record not written over its stand-in (%s); writing it again", exc)
        try:
            await self._journal.append(document, self._track, entry_id=call_id)
        except OSError as exc:
            # No durable copy: the ledger itself is the only place left, so the answer waits for it.
            log.error("usage journal not writable (%s): sending the record to the ledger directly", exc)
            # Unacknowledged until the ledger holds it, in memory only: the replay sends it again, and its
            # acknowledgement also ends a stream's stand-in for it in the journal.
            entry = self._unacked[call_id] = JournalEntry(call_id, document)
            self._sending.add(call_id)  # not sent by the replay meanwhile
            try:
                delivered = await self._send_batch([entry])
            finally:
                self._sending.discard(call_id)
            if not delivered:
                log.error(
                    "usage record neither journaled nor delivered; kept in memory", extra={"record": document}
                )

    def _track(self, entry: JournalEntry) -> None:
        """A record now durable: sent in the next batch, and again by the replay until the ledger holds it."""
        self._unacked[entry.entry_id] = entry
        if self._journal.held() > self._hold_records:
            # The ledger has not taken records for a while: whole segments go to disk only, their records
            # out of memory (read back by the replay once the ledger takes what is held).
            for parked in self._journal.park(self._hold_records // 2):
                self._unacked.pop(parked, None)
                self._queued.pop(parked, None)
        if self._breaker.allows():
            self._enqueue([entry])

    def _enqueue(self, entries: list[JournalEntry]) -> None:
        for entry in entries:
            if entry.entry_id not in self._sending:
                self._queued[entry.entry_id] = entry
        if self._queued and (self._sender is None or self._sender.done()):
            # The delivery outlives the request: it keeps the request id for its logs but not the
            # request's deadline, which would fail the ledger call the moment a client's deadline passed.
            context = contextvars.copy_context()
            context.run(deadline.start, None)
            self._sender = asyncio.get_running_loop().create_task(self._send_queued(), context=context)

    async def _send_queued(self) -> None:
        """Sends what is queued, a batch at a time, until nothing is left or the ledger stops answering."""
        while self._queued and self._breaker.allows():
            if len(self._queued) < MAX_BATCH:
                await asyncio.sleep(self._gather_seconds)
            batch = list(self._queued.values())[:MAX_BATCH]
            for entry in batch:
                del self._queued[entry.entry_id]
            self._sending.update(entry.entry_id for entry in batch)
            try:
                delivered = await self._send_batch(batch)
            finally:
                self._sending.difference_update(entry.entry_id for entry in batch)
            if not delivered:
                return  # left unacknowledged: the replay sends them again

    def _record_of(self, entry: JournalEntry) -> UsageRecord:
        record = UsageRecord.from_json(entry.record)
        if entry.entry_id in self._conflicted:
            return replace(record, request_id=derived_request_id(record.request_id, entry.entry_id))
        return record

    async def _send_batch(self, batch: list[JournalEntry]) -> bool:
        """True when the ledger answered for every record (each held, a duplicate or refused for good);
        entries it holds are acknowledged in the journal. A conflict is sent again at once, under its
        derived id."""
        request = pb.RecordUsagesRequest(records=[self._record_of(entry).to_proto() for entry in batch])
        try:
            reply = await self._stub.RecordUsages(request, timeout=RECORD_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in UNREACHABLE:
                self._breaker.record_failure(exc.code().name)
            else:
                log.warning("usage records not delivered (%s); they wait in the journal", exc.code().name)
            return False
        self._breaker.record_success()
        retry: list[JournalEntry] = []
        answered: list[JournalEntry] = []  # for good: held, a duplicate, or refused as invalid
        for entry, result in zip(batch, reply.results, strict=True):
            if result.status == pb.RECORD_STATUS_CONFLICT and entry.entry_id not in self._conflicted:
                record = UsageRecord.from_json(entry.record)
                derived = derived_request_id(record.request_id, entry.entry_id)
                log.warning(
                    "request id %s already recorded with other usage; recording as %s",
                    record.request_id,
                    derived,
                )
                self._conflicted.add(entry.entry_id)
                retry.append(entry)
                continue
            if result.status == pb.RECORD_STATUS_INVALID:
                log.error("ledger rejected usage record: %s", result.error, extra={"record": entry.record})
            answered.append(entry)
        self._acknowledge(answered)
        return await self._send_batch(retry) if retry else True

    def _acknowledge(self, entries: list[JournalEntry]) -> None:
        acked = [entry.entry_id for entry in entries if self._unacked.pop(entry.entry_id, None) is not None]
        self._journal.ack(*acked)
        self._conflicted.difference_update(entry.entry_id for entry in entries)

    async def replay_once(self) -> int:
        """Sends unacknowledged records oldest first while the ledger takes them, reading parked ones back
        as what is held is taken; returns how many it took."""
        delivered = 0
        while self._breaker.allows():
            await self._unpark()  # whenever there is room: live traffic keeps something waiting all along
            waiting = [entry for entry in self._unacked.values() if entry.entry_id not in self._sending]
            if not waiting:
                break
            self._enqueue(waiting)
            await self._answered(waiting)
            taken = sum(1 for entry in waiting if entry.entry_id not in self._unacked)
            delivered += taken
            if not taken or self._journal.oldest_parked() is None:
                break
        if delivered:
            log.info("replayed %d usage records to the ledger", delivered)
        return delivered

    async def _answered(self, entries: list[JournalEntry]) -> None:
        """Waits until the batches carrying `entries` are answered, or the sender stops (the ledger failed);
        not for the sender to run dry, which under steady traffic it never does."""
        ids = {entry.entry_id for entry in entries}
        while self._sender is not None and not self._sender.done():
            if ids.isdisjoint(self._queued) and ids.isdisjoint(self._sending):
                return
            await asyncio.wait({self._sender}, timeout=self._gather_seconds)

    async def _unpark(self) -> bool:
        """Reads parked segments back, oldest first, until one holds records, when there is room for them;
        False when none did."""
        while (path := self._journal.oldest_parked()) is not None and len(self._unacked) <= (
            self._hold_records // 2
        ):
            try:
                entries = self._journal.unpark(path, await asyncio.to_thread(path.read_bytes))
            except OSError as exc:
                log.error("usage journal %s cannot be read back (%s): left for a restart", path.name, exc)
                self._journal.set_aside(path)
                continue
            if entries:
                self._hold(entries)
                return True
        return False

    async def _replay_forever(self) -> None:
        while True:
            await asyncio.sleep(self._replay_seconds)
            try:
                await self.replay_once()
            except Exception:
                log.exception("usage replay failed; retrying later")

    def pending(self) -> int:
        """Records the ledger has not acknowledged: held, and (about) those parked on disk."""
        return len(self._unacked) + self._journal.parked()

    async def close(self, within_seconds: float) -> None:
        """Stops replaying, gives records on their way a moment, and closes the journal. Whatever the
        ledger has not acknowledged stays in the journal for the next start."""
        if self._replay is not None:
            self._replay.cancel()
            await asyncio.gather(self._replay, return_exceptions=True)
        if self._sender is not None and not self._sender.done():
            await asyncio.wait({self._sender}, timeout=within_seconds)
        await self._breaker.aclose()
        await self._journal.close()
