"""The Gateway's usage recorder against a real CostLedger and Redis: records go in batches (one
RecordUsages call for what arrived within a few ms), a conflicting request id is
counted under its derived id, and what the ledger did not take waits in the journal until it is back."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
import uuid

import pytest
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.breaker import DependencyBreaker, grpc_health_probe
from services.gateway.usage import journal as journal_module
from services.gateway.usage.journal import UsageJournal
from services.gateway.usage.recorder import (
    RECORD_TIMEOUT_SECONDS,
    UsageRecord,
    UsageRecorder,
    derived_request_id,
    ledger_breaker,
    new_call_id,
)
from tests.support import internal_channel, mesh_environ
from tools.mesh import Mesh

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("usage-batches"), mesh_environ())
    try:
        mesh.start("redis")
        mesh.start("ledger")
        mesh.wait_ready(["redis", "ledger"], timeout=60)
        yield mesh
    finally:
        mesh.stop_all()


@contextlib.contextmanager
def ledger_down(mesh):
    """The ledger stopped for the block, started again (and ready) after it, whatever happens in it."""
    mesh.stop("ledger")
    try:
        yield
    finally:
        mesh.start("ledger")
        mesh.wait_ready(["ledger"], timeout=60)


class CountingLedger:
    """The real stub, with a count of the RecordUsages calls that went through it."""

    def __init__(self, stub: ledger_pb2_grpc.LedgerServiceStub) -> None:
        self._stub = stub
        self.batches: list[int] = []

    async def RecordUsages(self, request, **kwargs):
        self.batches.append(len(request.records))
        return await self._stub.RecordUsages(request, **kwargs)


async def started_recorder(
    stub, channel, journal: UsageJournal, replay_seconds: float = 60.0, **options
) -> UsageRecorder:
    """A recorder over `journal`, started, its breaker probing the ledger's health on `channel`."""
    breaker = DependencyBreaker("ledger", grpc_health_probe(channel, "sophia.ledger.v1.LedgerService"))
    recorder = UsageRecorder(stub, journal, replay_seconds, breaker, **options)
    await recorder.start()
    return recorder


def usage(tenant: str, request_id: str, tokens: int = 10) -> UsageRecord:
    return UsageRecord(request_id, tenant, "key_1", "model-a", "openai", tokens, tokens, False, time.time())


async def requests_recorded(stub, tenant: str) -> int:
    report = await stub.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant), timeout=10)
    return report.total.requests


async def wait_until_delivered(recorder: UsageRecorder) -> None:
    for _ in range(200):
        if recorder.pending() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{recorder.pending()} records still wait for the ledger")


async def test_concurrent_records_go_in_few_batches_each_counted_once(mesh, tmp_path):
    tenant = f"batches-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        counting = CountingLedger(stub)
        recorder = await started_recorder(counting, channel, UsageJournal(tmp_path))
        await asyncio.gather(*(recorder.record(usage(tenant, f"r-{i}")) for i in range(60)))
        await wait_until_delivered(recorder)
        await recorder.close(5)
        assert await requests_recorded(stub, tenant) == 60
    assert sum(counting.batches) == 60
    assert len(counting.batches) < 60 / 4, counting.batches  # batched, not one call per record


async def test_records_arriving_one_by_one_are_gathered_into_batches(mesh, tmp_path):
    """A record every 2 ms for 0.2 s: a batch waits 20 ms for more after its first record, so about ten
    calls carry the hundred. Sending each as soon as the previous call returned would make one call per
    ledger answer (a few ms), most with one or two records."""
    tenant = f"gathered-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        counting = CountingLedger(stub)
        recorder = await started_recorder(counting, channel, UsageJournal(tmp_path), gather_seconds=0.02)
        for i in range(100):
            await recorder.record(usage(tenant, f"r-{i}"))
            await asyncio.sleep(0.002)
        await wait_until_delivered(recorder)
        await recorder.close(5)
        assert await requests_recorded(stub, tenant) == 100
    assert sum(counting.batches) == 100
    assert len(counting.batches) <= 20, counting.batches


async def test_a_request_id_held_with_other_usage_is_counted_under_its_derived_id(mesh, tmp_path):
    tenant = f"conflict-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        await stub.RecordUsage(usage(tenant, "shared-id", tokens=1).to_proto(), timeout=10)
        recorder = await started_recorder(stub, channel, UsageJournal(tmp_path))
        await recorder.record(usage(tenant, "shared-id", tokens=99))
        await wait_until_delivered(recorder)
        await recorder.close(5)
        report = await stub.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant), timeout=10)
    # Both requests counted: the first under the id, the other under the id derived from its entry.
    assert (report.total.requests, report.total.input_tokens) == (2, 100)
    assert derived_request_id("shared-id", "x").startswith("shared-id~")


async def test_two_calls_with_equal_usage_under_one_request_id_are_both_counted(mesh, tmp_path):
    """A client's reused x-request-id (an embedding, a retried cut stream) with the same token counts is
    a second provider call, not a resend of the first: it is counted under its derived id."""
    tenant = f"reused-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        recorder = await started_recorder(stub, channel, UsageJournal(tmp_path))
        await recorder.record(usage(tenant, "reused-id"))
        await wait_until_delivered(recorder)
        await recorder.record(usage(tenant, "reused-id"))
        await wait_until_delivered(recorder)
        await recorder.close(5)
        report = await stub.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant), timeout=10)
    assert (report.total.requests, report.total.input_tokens) == (2, 20)


async def test_a_record_whose_caller_is_cancelled_during_its_write_still_reaches_the_ledger(mesh, tmp_path):
    """A client gone while its record waits in the group commit: the record is on disk and is sent in
    this run (not only after a restart), and its segment is not kept for it."""
    tenant = f"cancelled-{uuid.uuid4().hex[:6]}"
    in_flight = {"requests": 3}  # others in flight: the write gathers, in the journal's writer task
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        journal = UsageJournal(tmp_path, in_flight=lambda: in_flight["requests"])
        recorder = await started_recorder(stub, channel, journal)
        writing = asyncio.create_task(recorder.record(usage(tenant, "gone")))
        await asyncio.sleep(0)  # pending in the group commit
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        in_flight["requests"] = 1
        await recorder.record(usage(tenant, "next"))
        await wait_until_delivered(recorder)
        assert await requests_recorded(stub, tenant) == 2  # the replay (every 60 s) had no part in it
        await recorder.close(5)


async def test_a_streams_stand_in_is_never_sent_and_its_own_record_replaces_it(mesh, tmp_path):
    tenant = f"stand-in-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        recorder = await started_recorder(stub, channel, UsageJournal(tmp_path))
        call_id = new_call_id()
        await recorder.stand_in(usage(tenant, "streamed", tokens=1), call_id)
        await asyncio.sleep(0.1)  # a batch would have gone by now
        assert await requests_recorded(stub, tenant) == 0
        await recorder.record(usage(tenant, "streamed", tokens=9), call_id)
        await wait_until_delivered(recorder)
        await recorder.close(5)
        restarted = await started_recorder(stub, channel, UsageJournal(tmp_path))
        assert restarted.pending() == 0  # neither the stand-in nor the record waits any more
        await restarted.close(5)
        report = await stub.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant), timeout=10)
    assert (report.total.requests, report.total.input_tokens) == (1, 9)


async def test_with_the_journal_failing_a_record_goes_to_the_ledger_directly_and_ends_its_stand_in(
    mesh, tmp_path, monkeypatch
):
    tenant = f"disk-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        recorder = await started_recorder(stub, channel, UsageJournal(tmp_path))
        call_id = new_call_id()
        await recorder.stand_in(usage(tenant, "streamed", tokens=1), call_id)

        def disk_error(*args):
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(journal_module.os, "fdatasync", disk_error)
        await recorder.record(usage(tenant, "streamed", tokens=9), call_id)
        monkeypatch.undo()
        assert recorder.pending() == 0  # the ledger took it at once
        await recorder.close(5)
        restarted = await started_recorder(stub, channel, UsageJournal(tmp_path))
        assert restarted.pending() == 0  # the stand-in was ended with it: nothing to bill twice
        await restarted.close(5)
        report = await stub.GetUsageReport(pb.GetUsageReportRequest(tenant_id=tenant), timeout=10)
    assert (report.total.requests, report.total.input_tokens) == (1, 9)


async def test_a_journal_entry_this_gateway_cannot_read_does_not_hold_up_the_others(mesh, tmp_path):
    tenant = f"unreadable-{uuid.uuid4().hex[:6]}"
    journal = UsageJournal(tmp_path)
    journal.recover()
    await journal.append({"request_id": "half", "tenant_id": tenant})  # not a record this version wrote
    await journal.append({**usage(tenant, "whole").as_json(), "added_by_a_newer_version": 1})
    await journal.close()
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        recorder = await started_recorder(stub, channel, UsageJournal(tmp_path), 0.05)
        await wait_until_delivered(recorder)
        await recorder.close(5)
        assert await requests_recorded(stub, tenant) == 1


async def test_records_wait_while_the_ledger_is_down_and_arrive_once_when_it_is_back(mesh, tmp_path):
    tenant = f"outage-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        recorder = await started_recorder(stub, channel, UsageJournal(tmp_path))
        with ledger_down(mesh):
            await asyncio.gather(*(recorder.record(usage(tenant, f"d-{i}")) for i in range(20)))
            await asyncio.sleep(0.5)
            assert recorder.pending() == 20
        for _ in range(100):
            if await recorder.replay_once() or recorder.pending() == 0:
                break
            await asyncio.sleep(0.1)
        await wait_until_delivered(recorder)
        await recorder.replay_once()  # nothing left: sending again must not count anything twice
        await recorder.close(5)
        assert await requests_recorded(stub, tenant) == 20


async def test_a_ledger_hung_on_its_redis_is_one_outage_however_long_it_lasts(mesh, tmp_path, caplog):
    """The ledger answers health checks while its Redis hangs, so the breaker's probe closes it and each
    call let through fails only at its timeout: the outage must stay one (one WARNING, one INFO)."""
    caplog.set_level(logging.INFO, logger="libs.breaker")
    tenant = f"hung-{uuid.uuid4().hex[:6]}"
    redis = mesh.processes["redis"]
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        recorder = UsageRecorder(stub, UsageJournal(tmp_path), 60.0, ledger_breaker(channel))
        await recorder.start()
        redis.send_signal(signal.SIGSTOP)
        try:
            await recorder.record(usage(tenant, "h-0"))
            recorded = 1
            # Requests keep coming (each asks the breaker) through two calls that time out and longer.
            for i in range(1, int(2.5 * RECORD_TIMEOUT_SECONDS / 0.02)):
                await asyncio.sleep(0.02)
                if i % 10 == 0:
                    await recorder.record(usage(tenant, f"h-{i}"))
                    recorded += 1
        finally:
            redis.send_signal(signal.SIGCONT)
        for _ in range(100):  # what arrived while the breaker was open waits for the replay
            if await recorder.replay_once() or recorder.pending() == 0:
                break
            await asyncio.sleep(0.1)
        await wait_until_delivered(recorder)
        await recorder.close(5)
        assert await requests_recorded(stub, tenant) == recorded
    lines = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert [level for level, _ in lines if level in ("WARNING", "INFO")] == ["WARNING", "INFO"], lines


async def test_a_long_outage_holds_a_bounded_number_of_records_and_delivers_every_one_once(mesh, tmp_path):
    """Past `hold_records`, whole journal segments are parked on disk (out of memory) and read back as the
    ledger takes what is held: memory stays bounded, nothing is lost or counted twice."""
    tenant = f"long-outage-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        journal = UsageJournal(tmp_path, segment_max_bytes=2_000)  # a few records per segment
        recorder = await started_recorder(stub, channel, journal, hold_records=20)
        with ledger_down(mesh):
            most_held = 0
            for i in range(150):
                await recorder.record(usage(tenant, f"o-{i}"))
                most_held = max(most_held, journal.held())
            assert most_held <= 20 + 1 and journal.parked() > 0
            assert recorder.pending() >= 150 - 5  # parked records are still counted as waiting (about)
        for _ in range(200):
            await recorder.replay_once()
            if recorder.pending() == 0:
                break
            await asyncio.sleep(0.05)
        await wait_until_delivered(recorder)
        await recorder.close(5)
        assert await requests_recorded(stub, tenant) == 150
    assert UsageJournal(tmp_path).recover() == []


async def test_parked_records_are_read_back_while_new_traffic_keeps_coming(mesh, tmp_path):
    """Live traffic always leaves something waiting: the backlog must still drain, not wait for a lull."""
    tenant = f"busy-drain-{uuid.uuid4().hex[:6]}"
    async with internal_channel(mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        journal = UsageJournal(tmp_path, segment_max_bytes=2_000)
        # A hold limit of 20 records: batches that gather 20 ms of this traffic (about ten) stay within it.
        recorder = await started_recorder(stub, channel, journal, hold_records=20, gather_seconds=0.02)
        with ledger_down(mesh):
            for i in range(100):
                await recorder.record(usage(tenant, f"b-{i}"))
            assert journal.parked() > 0
        live = 0

        async def traffic() -> None:
            nonlocal live
            while True:
                await recorder.record(usage(tenant, f"live-{live}"))
                live += 1
                await asyncio.sleep(0.002)

        producing = asyncio.create_task(traffic())
        try:
            async with asyncio.timeout(30):  # a replay that waits for a lull would never return
                for _ in range(100):
                    await recorder.replay_once()
                    if journal.parked() == 0:
                        break
                    await asyncio.sleep(0.05)
            assert journal.parked() == 0  # drained with traffic still flowing
        finally:
            producing.cancel()
            await asyncio.gather(producing, return_exceptions=True)
        await wait_until_delivered(recorder)
        await recorder.close(5)
        assert await requests_recorded(stub, tenant) == 100 + live
