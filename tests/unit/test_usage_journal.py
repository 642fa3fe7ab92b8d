"""The write-ahead usage journal: durable appends with group commit, acks, segment clean-up, recovery."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from services.gateway.domain import CompletionChunk, Message, StreamTally, estimated_prompt_tokens
from services.gateway.usage import journal as journal_module
from services.gateway.usage.aio_fdatasync import AioFdatasync
from services.gateway.usage.journal import UsageJournal
from services.gateway.usage.recorder import UsageRecord, derived_request_id


def usage(request_id: str, tenant: str = "t", tokens: int = 1) -> dict:
    return asdict(UsageRecord(request_id, tenant, "k", "m", "p", tokens, tokens, False, 1_700_000_000.0))


@pytest.fixture(params=[True, False], ids=["aio-sync", "thread-sync"])
def kernel_syncs(request) -> bool:
    """Writes off the loop synced by Linux AIO, and (where there is none) in a worker thread."""
    return request.param


async def test_appended_records_survive_a_restart_until_acknowledged(tmp_path):
    journal = UsageJournal(tmp_path)
    assert journal.recover() == []
    first = await journal.append(usage("a"))
    second = await journal.append(usage("b"))
    journal.ack(first.entry_id)
    await journal.close()  # no clean shutdown is needed: the appends were fsync'ed already
    reopened = UsageJournal(tmp_path)
    assert [(e.entry_id, e.record) for e in reopened.recover()] == [(second.entry_id, usage("b"))]


async def test_one_request_id_for_two_tenants_and_unsafe_characters_never_collide(tmp_path):
    journal = UsageJournal(tmp_path)
    journal.recover()
    records = [usage("same", "tenant-a"), usage("same", "tenant-b"), usage("c:X"), usage("c_X")]
    await asyncio.gather(*(journal.append(record) for record in records))
    await journal.close()
    recovered = UsageJournal(tmp_path).recover()
    assert sorted(json.dumps(e.record, sort_keys=True) for e in recovered) == sorted(
        json.dumps(r, sort_keys=True) for r in records
    )


async def test_concurrent_appends_share_one_fsync(tmp_path, monkeypatch):
    fsyncs = []
    real_fsync = os.fdatasync
    monkeypatch.setattr(journal_module.os, "fdatasync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    in_flight = {"requests": 1}
    journal = UsageJournal(tmp_path, in_flight=lambda: in_flight["requests"])
    journal.recover()
    await journal.append(usage("warm-up"))  # creates the segment (a file and a folder fsync)
    fsyncs.clear()
    in_flight["requests"] = 200
    await asyncio.gather(*(journal.append(usage(f"r{i}")) for i in range(200)))
    # The first append starts a write; the 199 that arrive meanwhile go together in the next one.
    assert 1 <= len(fsyncs) <= 2
    await journal.close()
    assert len(UsageJournal(tmp_path).recover()) == 201


async def test_writes_run_on_the_loop_until_one_is_slow_then_in_a_worker_thread(
    tmp_path, monkeypatch, kernel_syncs
):
    threads: list[int | str] = []
    real_fsync = os.fdatasync
    slow = {"seconds": 0.0}

    def fsync(fd):
        threads.append(threading.get_ident())
        time.sleep(slow["seconds"])
        real_fsync(fd)

    journal = UsageJournal(tmp_path, kernel_syncs=kernel_syncs)
    journal.recover()
    await journal.append(usage("warm-up"))  # creates the segment (a file and a folder fsync)
    monkeypatch.setattr(journal_module.os, "fdatasync", fsync)
    record_kernel_syncs(monkeypatch, threads)
    loop_thread = threading.get_ident()
    await journal.append(usage("fast"))
    slow["seconds"] = journal_module.SLOW_WRITE_SECONDS * 2
    await journal.append(usage("slow"))  # still on the loop: nothing had been slow before it
    slow["seconds"] = 0.0
    await journal.append(usage("after"))
    # After a slow write even the bytes may block: a worker thread writes and syncs, not the loop or AIO.
    assert threads[:2] == [loop_thread, loop_thread] and threads[2] not in (loop_thread, "kernel")
    await journal.close()
    assert len(UsageJournal(tmp_path).recover()) == 4


def record_fsyncs(monkeypatch) -> list[int | str]:
    """The thread of each fsync of a record write from now on ("kernel" for an AIO sync)."""
    threads: list[int | str] = []
    real_fsync = os.fdatasync
    monkeypatch.setattr(
        journal_module.os, "fdatasync", lambda fd: (threads.append(threading.get_ident()), real_fsync(fd))
    )
    record_kernel_syncs(monkeypatch, threads)
    return threads


def record_kernel_syncs(monkeypatch, threads: list[int | str]) -> None:
    real_sync = AioFdatasync.sync
    monkeypatch.setattr(
        AioFdatasync, "sync", lambda self, fd: (threads.append("kernel"), real_sync(self, fd))[1]
    )


def failing_aio_syncs(monkeypatch) -> None:
    def sync(self, fd):
        done = asyncio.get_running_loop().create_future()
        done.set_exception(OSError(errno.EIO, "fdatasync: Input/output error"))
        return done

    monkeypatch.setattr(AioFdatasync, "sync", sync)


async def test_alone_in_flight_a_record_is_written_at_once_in_the_callers_task(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "COMMIT_DELAY_SECONDS", 30.0)
    journal = UsageJournal(tmp_path, in_flight=lambda: 1)
    journal.recover()
    await journal.append(usage("warm-up"))
    tasks = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(
        journal_module.os, "fdatasync", lambda fd: (tasks.append(asyncio.current_task()), real_fdatasync(fd))
    )
    async with asyncio.timeout(5):  # would wait the 30 s delay if it gathered
        await journal.append(usage("alone"))
    assert tasks == [asyncio.current_task()]  # on the loop, with no writer task to hand over to
    await journal.close()


async def test_with_others_in_flight_records_gather_into_one_write_off_the_loop(
    tmp_path, monkeypatch, kernel_syncs
):
    journal = UsageJournal(tmp_path, in_flight=lambda: 10, kernel_syncs=kernel_syncs)
    journal.recover()
    await journal.append(usage("warm-up"))
    threads = record_fsyncs(monkeypatch)

    async def later(i: int) -> None:
        await asyncio.sleep(i * journal_module.COMMIT_DELAY_SECONDS / 4)  # within the first one's delay
        await journal.append(usage(f"r{i}"))

    await asyncio.gather(*(later(i) for i in range(3)))
    assert threads == ["kernel" if kernel_syncs else threads[0]] and threads[0] != threading.get_ident()
    await journal.close()
    assert len(UsageJournal(tmp_path).recover()) == 4


async def test_the_write_goes_once_every_request_in_flight_has_its_record_pending(tmp_path, monkeypatch):
    journal = UsageJournal(tmp_path, in_flight=lambda: 3)
    journal.recover()
    await journal.append(usage("warm-up"))
    monkeypatch.setattr(journal_module, "COMMIT_DELAY_SECONDS", 30.0)
    threads = record_fsyncs(monkeypatch)

    async def later(i: int) -> None:
        await asyncio.sleep(i * 0.01)  # the first write is gathering when the others come
        await journal.append(usage(f"r{i}"))

    async with asyncio.timeout(5):  # not the 30 s delay: nobody else is left to wait for
        await asyncio.gather(*(later(i) for i in range(3)))
    assert len(threads) == 1
    await journal.close()


async def test_a_batch_of_acks_is_one_write(tmp_path, monkeypatch):
    journal = UsageJournal(tmp_path)
    journal.recover()
    entries = await asyncio.gather(*(journal.append(usage(f"r{i}")) for i in range(50)))
    writes = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(
        journal_module.os,
        "pwrite",
        lambda fd, data, offset: (writes.append(fd), real_pwrite(fd, data, offset))[1],
    )
    journal.ack(*(entry.entry_id for entry in entries[:40]))
    assert len(writes) == 1
    await journal.close()
    assert {e.entry_id for e in UsageJournal(tmp_path).recover()} == {e.entry_id for e in entries[40:]}


async def test_fully_acknowledged_segments_are_deleted(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=1)  # every write starts a new segment
    journal.recover()
    entries = [await journal.append(usage(f"r{i}")) for i in range(5)]
    assert journal.segment_count() == 5
    journal.ack(*(entry.entry_id for entry in entries[:-1]))
    assert journal.segment_count() == 1  # only the segment still being written is kept
    assert len(list(tmp_path.glob("usage-*.jsonl"))) == 1
    await journal.close()


async def test_a_torn_last_line_is_skipped_and_appends_go_to_a_new_segment(tmp_path):
    journal = UsageJournal(tmp_path)
    journal.recover()
    kept = await journal.append(usage("kept"))
    await journal.close()
    (segment,) = tmp_path.glob("usage-*.jsonl")
    segment.write_bytes(segment.read_bytes() + b'{"entry": "torn", "rec')
    reopened = UsageJournal(tmp_path)
    assert [e.entry_id for e in reopened.recover()] == [kept.entry_id]
    later = await reopened.append(usage("later"))
    reopened.ack(kept.entry_id)
    await reopened.close()
    assert [e.entry_id for e in UsageJournal(tmp_path).recover()] == [later.entry_id]


async def test_a_segment_is_allocated_ahead_and_written_from_its_start(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=64 * 1024)
    journal.recover()
    first = await journal.append(usage("a"))
    await journal.append(usage("b"))
    await journal.close()
    (segment,) = tmp_path.glob("usage-*.jsonl")
    assert segment.stat().st_size == 64 * 1024  # zeros after the lines: no write changes the size
    reopened = UsageJournal(tmp_path, segment_max_bytes=64 * 1024)
    assert [e.record["request_id"] for e in reopened.recover()] == ["a", "b"]
    reopened.ack(first.entry_id)  # goes after the last line, not after the allocated zeros
    await reopened.close()
    assert segment.stat().st_size == 64 * 1024
    assert [e.record["request_id"] for e in UsageJournal(tmp_path).recover()] == ["b"]


async def test_a_file_system_that_cannot_allocate_ahead_grows_the_segment_instead(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(journal_module.os, "posix_fallocate", unsupported)
    journal = UsageJournal(tmp_path)
    journal.recover()
    await journal.append(usage("a"))
    await journal.close()
    (segment,) = tmp_path.glob("usage-*.jsonl")
    assert segment.read_bytes().endswith(b"\n") and b"\0" not in segment.read_bytes()
    assert [e.record["request_id"] for e in UsageJournal(tmp_path).recover()] == ["a"]


async def test_lines_after_a_torn_write_are_still_read_and_acks_start_a_line_of_their_own(tmp_path):
    journal = UsageJournal(tmp_path)
    journal.recover()
    first = await journal.append(usage("a"))
    await journal.append(usage("b"))
    await journal.close()
    (segment,) = tmp_path.glob("usage-*.jsonl")
    lines = segment.read_bytes().rstrip(b"\0").splitlines(keepends=True)
    # A crash left the first line's write cut short and zeros where the rest of it would be, while the
    # line after it reached the disk; then one more torn write at the end.
    segment.write_bytes(lines[0] + b'{"entry": "torn", "rec' + b"\0" * 100 + lines[1] + b'{"entry": "x')
    reopened = UsageJournal(tmp_path)
    assert [e.record["request_id"] for e in reopened.recover()] == ["a", "b"]
    reopened.ack(first.entry_id)
    await reopened.close()
    assert [e.record["request_id"] for e in UsageJournal(tmp_path).recover()] == ["b"]


async def test_records_of_the_old_one_file_per_record_outbox_are_adopted(tmp_path):
    (tmp_path / "req_1.json").write_text(json.dumps(usage("req:1")))
    journal = UsageJournal(tmp_path)
    (entry,) = journal.recover()
    assert entry.record == usage("req:1")
    assert not list(tmp_path.glob("*.json"))
    await journal.close()
    assert [e.record for e in UsageJournal(tmp_path).recover()] == [usage("req:1")]


async def test_an_entry_written_again_is_recovered_as_its_last_line(tmp_path):
    journal = UsageJournal(tmp_path)
    journal.recover()
    await journal.append(usage("stream", tokens=1), entry_id="call-1")  # a stream's stand-in
    await journal.append(usage("other"))
    await journal.append(usage("stream", tokens=9), entry_id="call-1")  # its own record
    await journal.close()
    recovered = {e.entry_id: e.record for e in UsageJournal(tmp_path).recover() if e.entry_id == "call-1"}
    assert recovered == {"call-1": usage("stream", tokens=9)}


async def test_an_entry_replaced_in_a_later_segment_frees_the_earlier_and_its_ack_ends_both(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=300)  # about one record per segment
    journal.recover()
    await journal.append(usage("stream", tokens=1), entry_id="call-1")
    others = [await journal.append(usage(f"r{i}")) for i in range(3)]
    journal.ack(*(entry.entry_id for entry in others))
    assert journal.segment_count() >= 2  # the stand-in's segment is still needed
    await journal.append(usage("stream", tokens=9), entry_id="call-1")
    assert journal.segment_count() == 1  # the replacement is durable: nothing else holds the old segments
    await journal.close()
    reopened = UsageJournal(tmp_path)
    assert [(e.entry_id, e.record) for e in reopened.recover()] == [("call-1", usage("stream", tokens=9))]
    reopened.ack("call-1")
    await reopened.close()
    assert UsageJournal(tmp_path).recover() == []  # not the stand-in either: it would be billed twice


async def test_an_acked_replacement_ends_its_stand_in_in_a_segment_kept_for_another_entry(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=300)
    journal.recover()
    await journal.append(usage("stream", tokens=1), entry_id="call-1")
    waiting = await journal.append(usage("waiting"))  # keeps the stand-in's segment
    for i in range(2):
        journal.ack((await journal.append(usage(f"r{i}"))).entry_id)
    await journal.append(usage("stream", tokens=9), entry_id="call-1")
    journal.ack("call-1")
    await journal.close()
    assert [e.entry_id for e in UsageJournal(tmp_path).recover()] == [waiting.entry_id]


async def test_a_write_that_fails_with_any_error_fails_its_appends_instead_of_leaving_them_waiting(
    tmp_path, monkeypatch
):
    # Others in flight: written in a worker thread (where there is no Linux AIO).
    journal = UsageJournal(tmp_path, in_flight=lambda: 3, kernel_syncs=False)
    journal.recover()

    async def refused(*args, **kwargs):
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(journal_module.asyncio, "to_thread", refused)
    async with asyncio.timeout(5):
        with pytest.raises(RuntimeError):
            await journal.append(usage("late"))
    monkeypatch.undo()
    await journal.close()
    assert UsageJournal(tmp_path).recover() == []  # not booked: nothing was written


async def test_a_group_write_whose_kernel_sync_fails_fails_its_appends_and_hands_none_on(
    tmp_path, monkeypatch
):
    journal = UsageJournal(tmp_path, in_flight=lambda: 10)  # others in flight: the write goes off the loop
    journal.recover()
    failing_aio_syncs(monkeypatch)
    handed: list[str] = []
    async with asyncio.timeout(5):
        results = await asyncio.gather(
            *(journal.append(usage(f"r{i}"), lambda e: handed.append(e.entry_id)) for i in range(3)),
            return_exceptions=True,
        )
    assert [type(result) for result in results] == [OSError] * 3
    assert journal.held() == 0 and handed == []  # the recorder sends them to the ledger itself
    await journal.close()


def held_aio_syncs(monkeypatch) -> tuple[list[asyncio.Future], asyncio.Event]:
    """AIO syncs that end only when the test says so, and an event set at the first submission."""
    held, submitted = [], asyncio.Event()

    def sync(self, fd):
        held.append(asyncio.get_running_loop().create_future())
        submitted.set()
        return held[-1]

    monkeypatch.setattr(AioFdatasync, "sync", sync)
    return held, submitted


async def test_a_group_write_and_the_records_it_covers_are_handed_on_once_its_kernel_sync_ended(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(journal_module, "UNSYNCED_SECONDS", 30.0)
    journal = UsageJournal(tmp_path, in_flight=lambda: 10)
    journal.recover()
    handed: list[str] = []
    journal.write_over_stand_in(usage("r", tokens=9), lambda e: handed.append(e.entry_id), entry_id="call-1")
    held, submitted = held_aio_syncs(monkeypatch)
    appending = asyncio.ensure_future(journal.append(usage("r0"), lambda e: handed.append(e.entry_id)))
    await asyncio.wait_for(submitted.wait(), 5)
    await asyncio.sleep(0.01)
    assert not appending.done() and handed == []
    held[0].set_result(None)
    entry = await appending
    assert handed == ["call-1", entry.entry_id]
    await journal.close()


async def test_a_segment_with_a_write_in_flight_is_not_parked(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "UNSYNCED_SECONDS", 30.0)
    journal = UsageJournal(tmp_path, segment_max_bytes=100, in_flight=lambda: 10)  # a record fills one
    journal.recover()
    held, submitted = held_aio_syncs(monkeypatch)
    appending = asyncio.ensure_future(journal.append(usage("r0"), entry_id="r0"))
    await asyncio.wait_for(submitted.wait(), 5)
    journal.write_over_stand_in(usage("r1"), None, entry_id="r1")  # writing moves on to the next segment
    assert "r0" not in journal.park(keep=0)
    held[0].set_result(None)
    await appending
    await journal.close()
    assert {e.entry_id for e in UsageJournal(tmp_path).recover()} == {"r0", "r1"}


async def test_when_the_kernel_refuses_aio_syncs_writes_go_to_a_worker_thread(tmp_path, monkeypatch):
    journal = UsageJournal(tmp_path, in_flight=lambda: 10)
    journal.recover()

    def refused(self, fd):
        raise OSError(errno.EINVAL, "AIO fdatasync not submitted: Invalid argument")

    monkeypatch.setattr(AioFdatasync, "sync", refused)
    threads = []
    real_fsync = os.fdatasync
    monkeypatch.setattr(
        journal_module.os, "fdatasync", lambda fd: (threads.append(threading.get_ident()), real_fsync(fd))
    )
    for round_ in range(2):
        await asyncio.gather(*(journal.append(usage(f"r{round_}-{i}")) for i in range(3)))
    # Both writes synced in a worker thread: the refused one and the next.
    assert len(threads) == 2 and "kernel" not in threads and threading.get_ident() not in threads
    await journal.close()
    assert len(UsageJournal(tmp_path).recover()) == 6


async def test_a_submission_refused_for_the_moment_leaves_aio_syncs_on(tmp_path, monkeypatch):
    journal = UsageJournal(tmp_path, in_flight=lambda: 10)
    journal.recover()
    threads = record_fsyncs(monkeypatch)
    real_sync, refusals = AioFdatasync.sync, [errno.EAGAIN]

    def sync(self, fd):
        if refusals:
            raise OSError(refusals.pop(), "AIO fdatasync not submitted: Resource temporarily unavailable")
        return real_sync(self, fd)

    monkeypatch.setattr(AioFdatasync, "sync", sync)
    for round_ in range(2):
        await asyncio.gather(*(journal.append(usage(f"r{round_}-{i}")) for i in range(3)))
    # Once in a worker thread, then by AIO again.
    assert (
        len(threads) == 2 and threads[0] not in ("kernel", threading.get_ident()) and threads[1] == "kernel"
    )
    await journal.close()


async def test_a_stand_in_in_a_kept_segment_stays_ended_once_its_replacements_segment_is_gone(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=300)
    journal.recover()
    await journal.append(usage("stream", tokens=1), entry_id="call-1")
    await journal.append(usage("other stream", tokens=1), entry_id="call-2")  # keeps the segment
    for i in range(2):
        journal.ack((await journal.append(usage(f"r{i}"))).entry_id)
    await journal.append(usage("stream", tokens=9), entry_id="call-1")  # in a later segment
    journal.ack("call-1")
    for i in range(3):  # writing moves on: the replacement's segment is deleted
        journal.ack((await journal.append(usage(f"s{i}"))).entry_id)
    await journal.close()
    assert [e.entry_id for e in UsageJournal(tmp_path).recover()] == ["call-2"]


async def test_a_restart_ends_a_replaced_line_in_a_segment_it_keeps(tmp_path, monkeypatch):
    journal = UsageJournal(tmp_path, segment_max_bytes=300)
    journal.recover()
    monkeypatch.setattr(UsageJournal, "_end_earlier_line", lambda *args: None)  # a crash before it ran
    await journal.append(usage("stream", tokens=1), entry_id="call-1")
    await journal.append(usage("other stream", tokens=1), entry_id="call-2")
    for i in range(2):
        journal.ack((await journal.append(usage(f"r{i}"))).entry_id)
    await journal.append(usage("stream", tokens=9), entry_id="call-1")
    await journal.close()
    monkeypatch.undo()
    restarted = UsageJournal(tmp_path)
    recovered = {e.entry_id: e.record["input_tokens"] for e in restarted.recover()}
    assert recovered == {"call-1": 9, "call-2": 1}  # call-1 as its last line
    restarted.ack("call-1")
    for i in range(3):
        restarted.ack((await restarted.append(usage(f"s{i}"))).entry_id)
    await restarted.close()
    assert [e.entry_id for e in UsageJournal(tmp_path).recover()] == ["call-2"]


async def test_parked_segments_leave_memory_and_come_back_oldest_first_each_entry_once(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=300)  # about one record per segment
    journal.recover()
    written = [(await journal.append(usage(f"r{i}"))).entry_id for i in range(20)]
    dropped = journal.park(keep=3)
    assert journal.held() <= 3 and len(dropped) == 20 - journal.held()
    assert journal.parked() == len(dropped)
    seen = set()
    while (path := journal.oldest_parked()) is not None:
        back = journal.unpark(path, path.read_bytes())
        assert back and not seen & {e.entry_id for e in back}
        seen |= {e.entry_id for e in back}
        journal.ack(*(e.entry_id for e in back))
    assert seen == set(dropped) and journal.parked() == 0
    journal.ack(*(entry_id for entry_id in written if entry_id not in seen))
    await journal.close()
    assert UsageJournal(tmp_path).recover() == []  # every segment read back and acknowledged is gone


async def test_a_segment_holding_a_streams_stand_in_is_not_parked_until_it_is_replaced(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=300)
    journal.recover()
    await journal.append(usage("stream", tokens=1), entry_id="call-1", stand_in=True)
    alongside = (await journal.append(usage("alongside"))).entry_id  # in the stand-in's segment
    for i in range(6):
        await journal.append(usage(f"r{i}"))
    first = journal.park(keep=0)
    assert first and "call-1" not in first and alongside not in first  # kept while the stream runs
    await journal.append(usage("stream", tokens=9), entry_id="call-1")  # its record replaces it
    second = journal.park(keep=0)
    assert alongside in second and "call-1" not in second  # now free to park; the record is current
    await journal.close()
    recovered = {e.entry_id: e.record["input_tokens"] for e in UsageJournal(tmp_path).recover()}
    assert recovered["call-1"] == 9 and len(recovered) == 8  # once, as its last line


async def test_a_restart_reads_segments_up_to_its_limit_and_parks_the_rest(tmp_path):
    journal = UsageJournal(tmp_path, segment_max_bytes=300)
    journal.recover()
    written = {(await journal.append(usage(f"r{i}"))).entry_id for i in range(12)}
    await journal.close()
    restarted = UsageJournal(tmp_path, segment_max_bytes=300)
    held = {e.entry_id for e in restarted.recover(hold_limit=4)}
    assert 4 <= len(held) <= 5 and restarted.parked() > 0  # parked unread: counted by estimate
    while (path := restarted.oldest_parked()) is not None:
        back = {e.entry_id for e in restarted.unpark(path, path.read_bytes())}
        assert not back & held
        held |= back
    assert held == written
    await restarted.close()


def test_a_journaled_record_with_a_field_this_version_does_not_know_is_still_read():
    document = {**usage("r"), "call_id": "c1", "added_by_a_newer_version": 7}
    record = UsageRecord.from_json(document)
    assert (record.request_id, record.call_id, record.input_tokens) == ("r", "c1", 1)


def test_derived_request_ids_are_stable_distinct_and_short_enough():
    first = derived_request_id("client-id", "entry-1")
    assert first == derived_request_id("client-id", "entry-1")
    assert first != derived_request_id("client-id", "entry-2")
    assert first.startswith("client-id~")
    assert len(derived_request_id("x" * 128, "entry-1")) <= 128


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        # Cut off before any usage arrived: the prompt and the delivered text are estimated, never 0.
        ([CompletionChunk(text="Hello "), CompletionChunk(text="there")], (None, 4)),
        # The provider's counts win where it sent them (Anthropic's prompt, the local model's running counts).
        ([CompletionChunk(text="Hi", prompt_tokens=7, completion_tokens=3)], (7, 3)),
    ],
)
def test_a_stream_tally_bills_what_was_delivered(chunks, expected):
    messages = (Message(role="user", content="What is the capital of France?"),)
    tally = StreamTally(prompt_estimate=estimated_prompt_tokens(messages))
    for chunk in chunks:
        tally.add(chunk)
    completion = tally.completion()
    prompt, output = expected
    assert completion.prompt_tokens == (prompt or estimated_prompt_tokens(messages)) > 0
    assert completion.completion_tokens == output
    assert completion.finish_reason == "cancelled"


def synced_segments(monkeypatch) -> list[tuple[str, bytes]]:
    """What each fdatasync made durable: the synced file's name and bytes (a crash of the machine itself
    keeps no more of a segment than its last sync)."""
    synced = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        real_fdatasync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        with open(path, "rb") as segment:
            synced.append((os.path.basename(path), segment.read()))

    monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync)
    return synced


async def recovered_tokens(folder) -> dict[str, int]:
    journal = UsageJournal(folder)
    tokens = {e.entry_id: e.record["input_tokens"] for e in journal.recover()}
    await journal.close()
    return tokens


async def test_a_call_alone_in_flight_is_durable_as_its_stand_in_and_its_record_handed_on_once_synced(
    tmp_path, monkeypatch
):
    journal = UsageJournal(tmp_path / "journal", in_flight=lambda: 1)
    journal.recover()
    await journal.append(usage("warm-up"), entry_id="warm-up")
    synced = synced_segments(monkeypatch)
    handed: list[str] = []
    assert journal.stand_in_now("call-1", lambda: usage("r", tokens=3))
    assert len(synced) == 1 and b'"call-1"' in synced[0][1]  # synced the moment it is written
    journal.write_over_stand_in(usage("r", tokens=9), handed.append, entry_id="call-1")
    assert handed == [] and len(synced) == 1  # written, not synced, so not handed on to the ledger yet
    # A process killed now loses nothing written; a machine failing now keeps the stand-in.
    assert await recovered_tokens(tmp_path / "journal") == {"warm-up": 1, "call-1": 9}
    (tmp_path / "machine").mkdir()
    (tmp_path / "machine" / synced[0][0]).write_bytes(synced[0][1])
    assert await recovered_tokens(tmp_path / "machine") == {"warm-up": 1, "call-1": 3}
    await asyncio.sleep(journal_module.UNSYNCED_SECONDS * 2)  # synced on its own within UNSYNCED_SECONDS
    assert [entry.entry_id for entry in handed] == ["call-1"] and len(synced) == 2
    assert b'"input_tokens":9' in synced[1][1]
    await journal.close()


async def test_the_next_calls_stand_in_syncs_the_record_written_over_the_last_one(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "UNSYNCED_SECONDS", 30.0)
    journal = UsageJournal(tmp_path, in_flight=lambda: 1)
    journal.recover()
    await journal.append(usage("warm-up"))
    synced = synced_segments(monkeypatch)
    handed: list[str] = []
    for call in ("call-1", "call-2"):
        assert journal.stand_in_now(call, lambda: usage("r", tokens=3))
        journal.write_over_stand_in(usage("r", tokens=9), lambda e: handed.append(e.entry_id), entry_id=call)
    assert handed == ["call-1"] and len(synced) == 2  # one sync each, the second covering call-1's record
    await journal.close()


async def test_with_others_in_flight_no_stand_in_is_written(tmp_path):
    journal = UsageJournal(tmp_path, in_flight=lambda: 5)
    journal.recover()
    made = []
    assert not journal.stand_in_now("call-1", lambda: made.append(1) or usage("r"))
    assert made == []  # not even built: the call's own record is written synced with the others'
    await journal.close()
    assert UsageJournal(tmp_path).recover() == []


async def test_a_withdrawn_stand_in_is_not_recovered_once_its_withdrawal_is_synced(tmp_path, monkeypatch):
    journal = UsageJournal(tmp_path, in_flight=lambda: 1)
    journal.recover()
    await journal.append(usage("warm-up"), entry_id="warm-up")
    synced = synced_segments(monkeypatch)
    assert journal.stand_in_now("call-1", lambda: usage("r", tokens=3))
    journal.withdraw("call-1")
    await asyncio.sleep(journal_module.UNSYNCED_SECONDS * 2)
    assert b'{"ack":"call-1"}' in synced[1][1]
    await journal.close()
    assert [e.entry_id for e in UsageJournal(tmp_path).recover()] == ["warm-up"]


async def test_a_segment_with_a_record_not_yet_synced_is_not_parked(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "UNSYNCED_SECONDS", 30.0)
    journal = UsageJournal(tmp_path, segment_max_bytes=300)  # about one record per segment
    journal.recover()
    assert journal.stand_in_now("call-1", lambda: usage("r", tokens=3))
    journal.write_over_stand_in(usage("r", tokens=9), None, entry_id="call-1")
    for i in range(4):
        await journal.append(usage(f"r{i}"))
    assert "call-1" not in journal.park(keep=0)  # its segment's fd stays open for the sync to come
    await journal.close()
    assert (await recovered_tokens(tmp_path))["call-1"] == 9


async def test_a_record_is_synced_on_its_own_only_once_it_waited_unsynced_seconds(tmp_path, monkeypatch):
    """Call after call, each stand-in's sync covers the last record: the timer syncs only after a pause."""
    monkeypatch.setattr(journal_module, "UNSYNCED_SECONDS", 30.0)  # the timer is fired by hand below
    clock = {"now": 100.0}
    monkeypatch.setattr(journal_module, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    journal = UsageJournal(tmp_path, in_flight=lambda: 1)
    journal.recover()
    await journal.append(usage("warm-up"))
    synced = synced_segments(monkeypatch)
    handed: list[str] = []
    for call, at in (("call-1", 100.0), ("call-2", 110.0)):
        clock["now"] = at
        assert journal.stand_in_now(call, lambda: usage("r", tokens=3))
        journal.write_over_stand_in(usage("r", tokens=9), lambda e: handed.append(e.entry_id), entry_id=call)
    clock["now"] = 131.0  # the timer set at call-1's record fires: call-2's has waited 21 s only
    journal._sync_dirty()
    assert handed == ["call-1"] and len(synced) == 2
    clock["now"] = 141.0
    journal._sync_dirty()
    assert handed == ["call-1", "call-2"] and len(synced) == 3
    await journal.close()
