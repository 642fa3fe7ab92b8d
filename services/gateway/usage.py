"""Usage records for the CostLedger, never lost and never counted twice.

Each record goes to the ledger off the response path. If the ledger cannot take it, the record is
spooled to a local outbox (one fsync'ed JSON file per request id) and replayed until the ledger accepts
it. The ledger is idempotent by request id, so a replay of a record that did arrive adds nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

log = logging.getLogger(__name__)

RECORD_TIMEOUT_SECONDS = 2.0
# Only these mean "the ledger refused this record"; every other failure means "try again later".
_REJECTED = {grpc.StatusCode.INVALID_ARGUMENT}


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


class Outbox:
    """A folder of pending records that survives a Gateway restart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, request_id: str) -> Path:
        # Request ids are restricted to [A-Za-z0-9._:-] by the Gateway; ':' is the only one unsafe in names.
        return self.folder / f"{request_id.replace(':', '_')}.json"

    def put(self, record: UsageRecord) -> None:
        final = self._path(record.request_id)
        temporary = final.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            json.dump(asdict(record), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def pending(self) -> list[tuple[Path, UsageRecord]]:
        entries = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                entries.append((path, UsageRecord(**json.loads(path.read_text()))))
            except (OSError, ValueError, TypeError):
                log.error("unreadable outbox entry %s left in place", path.name)
        return entries


class UsageRecorder:
    def __init__(
        self, stub: ledger_pb2_grpc.LedgerServiceStub, outbox: Outbox, replay_seconds: float
    ) -> None:
        self._stub = stub
        self._outbox = outbox
        self._replay_seconds = replay_seconds

    async def _send(self, record: UsageRecord) -> bool:
        """True when the ledger holds the record (now or from an earlier attempt)."""
        try:
            await self._stub.RecordUsage(record.to_proto(), timeout=RECORD_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REJECTED:
                log.error("ledger rejected usage record: %s", exc.details(), extra={"record": asdict(record)})
                return True
            return False
        return True

    async def record(self, record: UsageRecord) -> None:
        if not await self._send(record):
            await asyncio.to_thread(self._outbox.put, record)
            log.warning("ledger unavailable: usage record spooled to the outbox")

    async def replay_once(self) -> int:
        """Sends spooled records oldest first; stops at the first failure. Returns how many were sent."""
        sent = 0
        for path, record in await asyncio.to_thread(self._outbox.pending):
            if not await self._send(record):
                break
            path.unlink(missing_ok=True)
            sent += 1
        if sent:
            log.info("replayed %d spooled usage records", sent)
        return sent

    async def replay_forever(self) -> None:
        while True:
            try:
                await self.replay_once()
            except Exception:
                log.exception("outbox replay failed; retrying later")
            await asyncio.sleep(self._replay_seconds)
