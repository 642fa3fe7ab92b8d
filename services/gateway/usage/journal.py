"""The write-ahead journal of usage records: a record is on disk before the ledger is asked for it.

Segment files of JSON lines in one folder, each written from its start onwards:

    usage-<sequence>.jsonl   {"entry": "<id>", "record": {...}}   a record, on disk before append() returns
                             {"ack": "<id>"}                      the ledger holds it (not synced)

A segment is allocated at its full size when it is made (zeros after the last line), so a record's write
changes no file size and its fdatasync has no metadata to commit: measured on this machine's ext4 under
`make bench` load, 90–130 µs instead of 135–165 µs for an append and fsync (p50), 25–35 % less CPU.
A file system that cannot allocate ahead just grows the file as before.

Group commit: appends that arrive while a write is on its way wait for the next one, so one write and
one fdatasync cover every record pending at that moment. How a write goes depends on what else the Gateway
has in flight (`in_flight`, its admission count):
  * nothing else: at once, in the caller's own task on the event loop's thread (as Redis runs its
    `appendfsync always`): nobody else is waiting for the loop, and a sync (about 0.1 ms here) costs
    less than a trip to a worker thread and back, so one request alone gets its answer soonest;
  * other requests too: the write first waits up to COMMIT_DELAY_SECONDS for their records (less once
    every request in flight has one pending), then goes off the loop: its bytes are copied into the
    page cache from the loop's thread and the kernel syncs them by Linux AIO (`aio_fdatasync`) while the
    loop serves on; where there is no AIO, both run in a worker thread.
    At 900 requests/s one fsync per request had kept the Gateway's thread blocked a fifth of its time;
    gathered, a write carries several records (measured under `make bench` at 64 connections against
    writing every record on the loop: 0.2–0.4 ms less CPU per request in all, a fifth to a third more
    requests/s), for a few ms more latency under load. AIO instead of a worker thread (measured the same
    way, interleaved pairs; README "Benchmark", eleventh round): 3–9 % more requests/s and 3–10 % less
    of the Gateway's CPU per request (set against Envoy's), since no thread hands the write over and
    back or waits for the GIL.
A write on the loop that takes longer than SLOW_WRITE_SECONDS (a disk in trouble) sends the next
SLOW_DISK_SECONDS of writes to a worker thread (bytes and sync: even a write may block then), so a slow
disk delays only the requests waiting on it.

An ack line goes to the segment of its record without a sync: a lost ack only makes a restart send
the record again, which the ledger answers as a duplicate. A segment whose records are all acknowledged
is deleted once writing has moved on to the next one.

Parked segments bound the memory a long ledger outage takes (about 1 KB per record held, 3.6 GB an hour
at 1,000 requests/s): past the recorder's limit, whole segments no longer written to are parked — their
records stay on disk only, their file is closed and nothing of them is kept but a count — and are read
back, oldest first, once the ledger has taken what is held (`unpark`). A segment holding a stream's
stand-in is not parked while its stream runs. A restart likewise reads segments only up to the limit and
parks the rest. An ack for a parked record is not written (it is not known where): the record is sent
again when its segment is read back, and the ledger answers it as a duplicate. (A restart merges a
stream's stand-in with its record in a later segment only among the segments it reads: a crash in the
moment between writing that record and ending its stand-in, with a backlog past the limit, could bill
both.)

An entry may be written again under its id: a stream's stand-in record (on disk before its first chunk
goes out, never sent to the ledger) is replaced by the stream's own record when it settles. A restart
takes each entry's last record line, in whichever segment, unless an ack follows it. Once the
replacement is durable, a synced ack line in the stand-in's segment (when that is another one) ends the
stand-in there: that segment may be kept for other entries after the replacement's is gone.

A call alone in flight journals a stand-in too, the moment its request has gone to the provider
(`stand_in_now`: its prompt's estimate, synced on the loop while the provider works), and its own record
is then written over it without waiting for a sync of its own (`write_over_stand_in`): the call is on disk
before its answer goes out, as its stand-in. Its record is synced by the next write's fdatasync, or by
itself after at most UNSYNCED_SECONDS, and only then handed on to the ledger: the ledger never holds a
record the journal could lose. Should the machine itself fail within that moment (a process killed
loses nothing written), the restart bills the stand-in: the prompt's estimate instead of the call's
counts. A call that ends with nothing to bill withdraws its stand-in (an ack line, synced the same way).

Entries are named by a fresh id, never by the request id, so two tenants using one request id, or ids
that differ only in characters a file name cannot hold, can never overwrite each other.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from services.gateway.usage.aio_fdatasync import AioFdatasync

log = logging.getLogger(__name__)

SEGMENT_MAX_BYTES = 4 * 1024 * 1024
# Far above an fsync's usual 0.1 ms; this machine's disk has single fsyncs of ~60 ms now and then.
SLOW_WRITE_SECONDS = 0.05
# Long enough to ride out a burst of slow writes, short enough to come back soon after one.
SLOW_DISK_SECONDS = 5.0
# How long a write waits for the records of other requests in flight (see the module's docstring): at
# 1,000 requests/s a write then carries about four; small beside a loaded Gateway's latency.
COMMIT_DELAY_SECONDS = 0.004
# How long a record written over its call's durable stand-in waits for its own sync, at most: at one
# request at a time the next request's stand-in syncs it sooner.
UNSYNCED_SECONDS = 0.005
# What io_submit answers where a file system (or kernel) takes no AIO fdatasync at all.
_NO_AIO_SYNCS = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))
_SEGMENT_GLOB = "usage-*.jsonl"
# One JSON file per record, the format of the outbox before the journal; read once at start-up.
_LEGACY_GLOB = "*.json"
# Lines end at a newline; zeros are the unwritten rest of a segment, or a write a crash cut short.
_LINE_ENDS = re.compile(rb"[\n\0]+")


@dataclass(frozen=True)
class JournalEntry:
    entry_id: str
    record: dict[str, Any]  # a usage record as JSON


@dataclass
class _Segment:
    path: Path
    fd: int  # -1 while parked
    size: int = 0  # where the next line goes: the end of what was written, not of the file
    unacked: set[str] = field(default_factory=set)
    parked: int = 0  # records left on disk only while the segment is parked (see the module's docstring)

    @property
    def is_parked(self) -> bool:
        return self.fd < 0

    def reserve(self, length: int) -> int:
        """The offset for a write of `length` bytes, booked on the event loop's thread (a record's write
        may then be synced off the loop while acks are written after it)."""
        offset = self.size
        self.size += length
        return offset


@dataclass(frozen=True)
class _Pending:
    """An append waiting for the next write."""

    entry: JournalEntry
    written: asyncio.Future[None]
    on_durable: Callable[[JournalEntry], None] | None
    stand_in: bool = False


@dataclass(frozen=True)
class _Write:
    fd: int
    data: bytes
    offset: int
    # Entries it writes again (a stream's record replacing its stand-in): id and the segment held before.
    replaced: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class _Unsynced:
    """A record written over its call's durable stand-in, waiting for a sync (see the module's docstring)."""

    entry: JournalEntry
    on_durable: Callable[[JournalEntry], None] | None
    write: _Write


def _segment_name(sequence: int) -> str:
    return f"usage-{sequence:012d}.jsonl"


def _line(document: dict) -> bytes:
    # orjson: the same compact UTF-8 JSON (read back with json.loads) in 0.4 µs instead of 5.3 (three lines
    # per request: stand-in, record, ack).
    return orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE)


def _records_in(data: bytes) -> int:
    """About how many records a segment's bytes hold unacknowledged (a record written twice counts twice)."""
    return max(0, data.count(b'{"entry":') - data.count(b'{"ack":'))


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:  # not supported here, or no room yet: the writes grow the file instead
        log.debug("usage journal: segment not allocated ahead (%s)", exc)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class UsageJournal:
    def __init__(
        self,
        folder: Path,
        *,
        segment_max_bytes: int = SEGMENT_MAX_BYTES,
        in_flight: Callable[[], int] = lambda: 0,
        kernel_syncs: bool = True,
    ) -> None:
        """`in_flight`: how many requests the Gateway has in flight (each may be about to append).
        `kernel_syncs`: writes off the loop are synced by Linux AIO where it is at hand."""
        self.folder = folder
        self._in_flight = in_flight
        self._segment_max_bytes = segment_max_bytes
        self._segments: dict[int, _Segment] = {}
        self._segment_of: dict[str, int] = {}  # entry id → sequence of the segment holding it
        self._current: int | None = None  # the segment appends go to
        self._next_sequence = 1
        self._pending: list[_Pending] = []
        self._writer: asyncio.Task | None = None
        self._gathering: asyncio.Future[None] | None = None  # set when every request in flight appended
        self._slow_until = 0.0  # writes go to a worker thread until then (after a slow one)
        self._stand_ins: set[str] = set()  # entries whose last line is a stand-in of a stream under way
        self._parked_total = 0  # about how many records wait in parked segments (read by the metrics thread)
        self._unsynced: dict[str, _Unsynced] = {}  # entry id → its record written over a stand-in, unsynced
        # Segments (fds) with lines written since their last sync → when the first of those was written.
        self._dirty: dict[int, float] = {}
        self._sync_timer: asyncio.TimerHandle | None = None
        # The segment (fd) a write off the loop is under way in: not parked meanwhile (one writer at a time).
        self._writing_fd: int | None = None
        self._aio: AioFdatasync | None = None
        self._aio_wanted = kernel_syncs
        folder.mkdir(parents=True, exist_ok=True)

    def _aio_here(self) -> AioFdatasync | None:
        """The kernel's AIO syncs on the running loop, opened on first use (None where there are none)."""
        if self._aio_wanted:
            self._aio_wanted = False
            self._aio = AioFdatasync.open(asyncio.get_running_loop())
        return self._aio

    # --- start-up ------------------------------------------------------------------------------------

    def recover(self, hold_limit: int | None = None) -> list[JournalEntry]:
        """The entries an earlier run left unacknowledged, oldest first, each as its last record line
        wrote it (in any segment). Past `hold_limit` entries, the later segments are parked unread (see
        the module's docstring). Call once, before any append."""
        latest: dict[str, tuple[int, dict[str, Any]]] = {}  # entry id → (segment, its last record)
        earlier: list[tuple[str, int]] = []  # record lines of an entry that a later segment wrote again
        read_bytes = 0
        for path in sorted(self.folder.glob(_SEGMENT_GLOB)):
            sequence = int(path.stem.removeprefix("usage-"))
            self._next_sequence = max(self._next_sequence, sequence + 1)
            if hold_limit is not None and len(latest) >= hold_limit:
                # Not read (a long outage's backlog would hold up the start): counted as a full segment
                # of the records read so far.
                estimate = max(1, self._segment_max_bytes * len(latest) // max(1, read_bytes))
                self._segments[sequence] = _Segment(path, -1, parked=estimate)
                self._parked_total += estimate
                continue
            written = self._read_lines(path.read_bytes(), path, sequence, latest, earlier)
            read_bytes += len(written)
            self._segments[sequence] = _Segment(path, os.open(path, os.O_WRONLY), len(written))
            if written and not written.endswith(b"\n"):  # a torn last line: what follows starts its own
                segment = self._segments[sequence]
                _write_all(segment.fd, b"\n", segment.reserve(1))
        for entry_id, (sequence, _) in latest.items():
            self._segments[sequence].unacked.add(entry_id)
            self._segment_of[entry_id] = sequence
        # A parked segment's count is only an estimate: it goes once it has been read back, not before.
        done = [number for number, seg in self._segments.items() if not (seg.unacked or seg.is_parked)]
        for sequence in done:
            segment = self._segments.pop(sequence)
            os.close(segment.fd)
            segment.path.unlink(missing_ok=True)
        for entry_id, sequence in earlier:
            if sequence in self._segments:  # kept for another entry: ended there (see _end_earlier_line)
                self._end_earlier_line(entry_id, sequence)
        oldest_first = sorted(latest.items(), key=lambda item: item[1][0])
        entries = [JournalEntry(entry_id, record) for entry_id, (_, record) in oldest_first]
        entries.extend(self._adopt_legacy_files())
        return entries

    @staticmethod
    def _read_lines(
        data: bytes,
        path: Path,
        sequence: int,
        latest: dict[str, tuple[int, dict[str, Any]]],
        earlier: list[tuple[str, int]],
    ) -> bytes:
        """Reads the lines of segment `sequence` (its bytes `data`) into `latest` (a record line replaces an
        earlier one of its entry, an ack removes it; a replaced line of another segment goes to `earlier`);
        returns what was written of the segment. A torn line is skipped."""
        data = data.rstrip(b"\0")
        for number, raw in enumerate(_LINE_ENDS.split(data), start=1):
            if not raw:
                continue
            try:
                document = json.loads(raw)
                if "ack" in document:
                    latest.pop(document["ack"], None)
                else:
                    entry_id = document["entry"]
                    if entry_id in latest and latest[entry_id][0] != sequence:
                        earlier.append((entry_id, latest[entry_id][0]))
                    latest[entry_id] = (sequence, dict(document["record"]))
            except (ValueError, TypeError, KeyError):
                # Only a write cut off by a crash ends this way: its request never got its answer.
                log.warning("unreadable line %d of usage journal %s skipped", number, path.name)
        return data

    def _adopt_legacy_files(self) -> list[JournalEntry]:
        """Moves records of the one-file-per-record outbox into the journal, then removes the files."""
        legacy = sorted(self.folder.glob(_LEGACY_GLOB))
        entries = []
        for path in legacy:
            try:
                entries.append(JournalEntry(uuid.uuid4().hex, dict(json.loads(path.read_text()))))
            except (OSError, ValueError, TypeError):
                log.error("unreadable outbox entry %s left in place", path.name)
        if entries:
            self._write_durably(self._book(entries))
            for path in legacy:
                path.unlink(missing_ok=True)
        return entries

    # --- appending -----------------------------------------------------------------------------------

    async def append(
        self,
        record: dict[str, Any],
        on_durable: Callable[[JournalEntry], None] | None = None,
        *,
        entry_id: str | None = None,
        stand_in: bool = False,
    ) -> JournalEntry:
        """Returns once the record is on disk (fdatasync'ed), in one write with whatever else was pending.
        `on_durable(entry)` runs the moment it is, in the task that wrote it: a caller cancelled while it
        waits (a client gone mid-request) still has its record handed on, not left on disk unknown to the
        recorder until the next start. `entry_id`: the caller's (unique) id for the entry, else a new one.
        `stand_in`: a stream's stand-in, to be written again under the same id (its segment is not parked
        meanwhile)."""
        entry = JournalEntry(entry_id or uuid.uuid4().hex, record)
        stand_ins = frozenset((entry.entry_id,)) if stand_in else frozenset()
        if self._writes_at_once():
            # Alone in flight: written now, with no task or future to hand the write over, and nothing
            # awaited before on_durable (nothing to cancel half-way).
            self._write_now([entry], stand_ins)
            if on_durable is not None:
                on_durable(entry)
            return entry
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(entry, written, on_durable, stand_in))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending())
        elif self._gathering is not None and len(self._pending) >= self._in_flight():
            _set_once(self._gathering)
        await asyncio.shield(written)  # a caller that goes away must not cancel the others' write
        return entry

    def _writes_at_once(self) -> bool:
        return self._writer is None and self._in_flight() <= 1 and not self._disk_is_slow()

    def stand_in_now(self, entry_id: str, record: Callable[[], dict[str, Any]]) -> bool:
        """Writes `record()` as a call's stand-in and syncs it, at once on the loop's thread, when a write
        goes at once anyway (nothing else in flight, see the module's docstring); False, writing nothing,
        otherwise. The call's own record may then be written with `write_over_stand_in`."""
        if not self._writes_at_once():
            return False
        self._write_now([JournalEntry(entry_id, record())], frozenset((entry_id,)))
        return True

    def write_over_stand_in(
        self, record: dict[str, Any], on_durable: Callable[[JournalEntry], None] | None, *, entry_id: str
    ) -> None:
        """Writes the record of a call whose stand-in `stand_in_now` made durable, without a sync: synced
        by the next write's fdatasync or within UNSYNCED_SECONDS, when `on_durable(entry)` runs."""
        entry = JournalEntry(entry_id, record)
        write = self._book([entry])
        try:
            _write_all(write.fd, write.data, write.offset)
        except OSError:
            self._unbook([entry], write)
            raise
        self._unsynced[entry_id] = _Unsynced(entry, on_durable, write)
        self._written_unsynced(write.fd)

    def withdraw(self, entry_id: str) -> None:
        """Ends a stand-in whose call had nothing to bill (no provider answered), synced like a record
        written over a stand-in."""
        sequence = self._segment_of.get(entry_id)
        self.ack(entry_id)
        segment = self._segments.get(sequence) if sequence is not None else None
        if segment is not None and not segment.is_parked:
            self._written_unsynced(segment.fd)

    def _written_unsynced(self, fd: int) -> None:
        self._dirty.setdefault(fd, time.monotonic())
        if self._sync_timer is None:
            self._sync_timer = asyncio.get_running_loop().call_later(UNSYNCED_SECONDS, self._sync_dirty)

    def _sync_dirty(self) -> None:
        """Syncs segments with lines left unsynced for UNSYNCED_SECONDS, on the loop. One call after another
        never needs it (each call's stand-in syncs the last one's record): only the last call before a
        pause does."""
        self._sync_timer = None
        now = time.monotonic()
        for fd, since in list(self._dirty.items()):
            # Passed over: a segment a hand-on below deleted or synced meanwhile, or one synced since the
            # timer was set and written again since.
            if self._dirty.get(fd) != since or now - since < UNSYNCED_SECONDS:
                continue
            try:
                os.fdatasync(fd)
            except OSError as exc:
                # Handed on all the same: the stand-in stays on disk, and the ledger's copy is the other.
                log.error("usage journal: a sync failed (%s); records handed on unsynced", exc)
            self._synced(fd)
        if self._dirty and self._sync_timer is None:
            due = min(self._dirty.values()) + UNSYNCED_SECONDS - time.monotonic()
            self._sync_timer = asyncio.get_running_loop().call_later(max(0.0, due), self._sync_dirty)

    def _synced(self, fd: int, covered: list[str] | None = None) -> None:
        """Segment `fd` was synced: records written over stand-ins in it (those of `covered`, written before
        the sync began, when it ran off the loop) are durable now and handed on."""
        if covered is None:
            self._dirty.pop(fd, None)
            covered = self._unsynced_in(fd)
        for entry_id in covered:
            unsynced = self._unsynced.pop(entry_id, None)
            if unsynced is None:
                continue
            self._written(unsynced.write)
            if unsynced.on_durable is not None:
                try:
                    unsynced.on_durable(unsynced.entry)
                except Exception:
                    log.exception("usage journal: an entry's hand-on failed")

    def _unsynced_in(self, fd: int) -> list[str]:
        return [entry_id for entry_id, unsynced in self._unsynced.items() if unsynced.write.fd == fd]

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                busy = self._in_flight() > len(self._pending)
                if busy:
                    await self._gather()
                batch, self._pending = self._pending, []
                try:
                    entries = [pending.entry for pending in batch]
                    stand_ins = frozenset(pending.entry.entry_id for pending in batch if pending.stand_in)
                    if busy or self._disk_is_slow():
                        await self._write_off_loop(entries, stand_ins)
                    else:
                        self._write_now(entries, stand_ins)
                except Exception as exc:  # OSError, or a worker thread refused at shutdown: no caller hangs
                    for pending in batch:
                        if not pending.written.done():
                            pending.written.set_exception(exc)
                    continue
                for pending in batch:
                    _set_once(pending.written)  # its caller resumes after the callbacks below have run
                for pending in batch:
                    if pending.on_durable is not None:
                        try:
                            pending.on_durable(pending.entry)
                        except Exception:
                            log.exception("usage journal: an entry's hand-on failed")
        finally:
            self._writer = None

    async def _gather(self) -> None:
        """Waits COMMIT_DELAY_SECONDS, or less once every request in flight has a record pending."""
        loop = asyncio.get_running_loop()
        self._gathering = loop.create_future()
        timer = loop.call_later(COMMIT_DELAY_SECONDS, _set_once, self._gathering)
        try:
            await self._gathering
        finally:
            timer.cancel()
            self._gathering = None

    def _disk_is_slow(self) -> bool:
        return time.monotonic() < self._slow_until

    def _write_now(self, entries: list[JournalEntry], stand_ins: frozenset[str] = frozenset()) -> None:
        """Writes `entries` durably on the loop's thread; on OSError they are booked as before it and the
        error is raised. A write slower than SLOW_WRITE_SECONDS sends the next writes to a worker thread."""
        write = self._book(entries, stand_ins)
        started = time.monotonic()
        try:
            self._write_durably(write)
        except OSError:
            self._unbook(entries, write)
            raise
        self._written(write)
        self._synced(write.fd)
        took = time.monotonic() - started
        if took > SLOW_WRITE_SECONDS:
            self._slow_until = time.monotonic() + SLOW_DISK_SECONDS
            log.warning(
                "usage journal: a write took %.0f ms; writing from a worker thread for %.0f s",
                took * 1000,
                SLOW_DISK_SECONDS,
            )

    async def _write_off_loop(self, entries: list[JournalEntry], stand_ins: frozenset[str]) -> None:
        """Writes `entries` durably while the loop serves on: the bytes from the loop's thread (a copy into
        the page cache) and the sync by Linux AIO where it is at hand, else (and while the disk is slow,
        when even a write may block) both from a worker thread. On an error they are booked as before it."""
        write = self._book(entries, stand_ins)
        covered = self._unsynced_in(write.fd)
        aio = None if self._disk_is_slow() else self._aio_here()
        self._writing_fd = write.fd
        try:
            if aio is None:
                await asyncio.to_thread(self._write_durably, write)
            else:
                _write_all(write.fd, write.data, write.offset)
                await self._sync_in_kernel(aio, write.fd)
        except Exception:
            self._unbook(entries, write)
            raise
        finally:
            self._writing_fd = None
        self._written(write)
        self._synced(write.fd, covered)

    def _sync_in_kernel(self, aio: AioFdatasync, fd: int) -> Awaitable[None]:
        """An AIO sync of segment `fd`. A submission the kernel refuses is synced in a worker thread
        instead; when the file system takes no AIO syncs at all, later writes go without AIO."""
        try:
            return aio.sync(fd)
        except OSError as exc:
            if exc.errno in _NO_AIO_SYNCS:
                log.warning("usage journal: no AIO syncs here (%s); syncing without them from now", exc)
                aio.close()
                self._aio = None
            return asyncio.to_thread(os.fdatasync, fd)

    def _book(self, entries: list[JournalEntry], stand_ins: frozenset[str] = frozenset()) -> _Write:
        """Picks the segment, books the entries and their bytes into it, on the event loop's thread: acks
        touch the same bookkeeping, and only the write itself may run off the loop. An entry booked
        before (a stream's stand-in record) is booked here now; its earlier line is superseded once this
        write is durable (see _written)."""
        segment, sequence = self._segment_for_writing()
        replaced = []
        for entry in entries:
            previous = self._segment_of.get(entry.entry_id)
            if previous is not None:
                replaced.append((entry.entry_id, previous))
            segment.unacked.add(entry.entry_id)
            self._segment_of[entry.entry_id] = sequence
            if entry.entry_id in stand_ins:
                self._stand_ins.add(entry.entry_id)
            else:  # a record, or the one replacing its stream's stand-in
                self._stand_ins.discard(entry.entry_id)
        data = b"".join(_line({"entry": e.entry_id, "record": e.record}) for e in entries)
        return _Write(segment.fd, data, segment.reserve(len(data)), tuple(replaced))

    def _written(self, write: _Write) -> None:
        """A write is durable: an earlier line of one of its entries in another segment is ended there."""
        for entry_id, previous in write.replaced:
            if self._segment_of.get(entry_id) != previous and previous in self._segments:
                self._end_earlier_line(entry_id, previous)

    def _end_earlier_line(self, entry_id: str, sequence: int) -> None:
        """An ack line after an entry's earlier line in segment `sequence`, synced: that segment may outlive
        the one holding the entry's last line (kept for another entry), and a restart must not take the
        earlier line up again once the last one is acknowledged and gone. The segment is then not kept
        for this entry."""
        segment = self._segments[sequence]
        segment.unacked.discard(entry_id)
        line = _line({"ack": entry_id})
        try:
            _write_all(segment.fd, line, segment.reserve(len(line)))
            os.fdatasync(segment.fd)
        except OSError as exc:
            log.error(
                "usage journal: entry %s's earlier line not ended (%s); a restart may send it", entry_id, exc
            )
        self._delete_if_done(sequence)

    def _unbook(self, entries: list[JournalEntry], write: _Write) -> None:
        """A write failed: its entries are booked as before it (a replaced one where its earlier line is)."""
        replaced = dict(write.replaced)
        for entry in entries:
            sequence = self._segment_of.pop(entry.entry_id, None)
            earlier = replaced.get(entry.entry_id)
            if sequence is not None and sequence != earlier:
                self._segments[sequence].unacked.discard(entry.entry_id)
            self._stand_ins.discard(entry.entry_id)
            if earlier is not None:
                self._segment_of[entry.entry_id] = earlier
                self._stand_ins.add(entry.entry_id)  # its stream's stand-in is still the last line

    @staticmethod
    def _write_durably(write: _Write) -> None:
        """One write and one fdatasync for every entry given."""
        _write_all(write.fd, write.data, write.offset)
        os.fdatasync(write.fd)

    def _segment_for_writing(self) -> tuple[_Segment, int]:
        current = self._segments.get(self._current) if self._current is not None else None
        if current is not None and current.size < self._segment_max_bytes:
            return current, self._current  # type: ignore[return-value]
        previous = self._current
        sequence, self._next_sequence = self._next_sequence, self._next_sequence + 1
        path = self.folder / _segment_name(sequence)
        segment = _Segment(path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        _allocate(segment.fd, self._segment_max_bytes)
        _fsync_folder(self.folder)  # the new file's name must survive a crash as well as its lines
        self._segments[sequence] = segment
        self._current = sequence
        if previous is not None:
            self._delete_if_done(previous)
        return segment, sequence

    # --- parking (bounded memory during a long ledger outage) -----------------------------------------

    def held(self) -> int:
        """Entries whose bookkeeping is in memory (not parked)."""
        return len(self._segment_of)

    def parked(self) -> int:
        """About how many unacknowledged records wait in parked segments."""
        return self._parked_total

    def park(self, keep: int) -> list[str]:
        """Parks whole segments no longer written to, newest first, until at most `keep` entries are held
        (or none is left to park); returns the ids of the entries no longer held. A segment holding a
        stream's stand-in stays."""
        dropped: list[str] = []
        for sequence in sorted(self._segments, reverse=True):
            if self.held() <= keep:
                break
            segment = self._segments[sequence]
            if sequence == self._current or segment.is_parked or not segment.unacked:
                continue
            # A stream's stand-in still to be replaced, a replaced line still to be ended here, or a line
            # not yet synced: kept.
            if (
                not segment.unacked.isdisjoint(self._stand_ins)
                or segment.fd in self._dirty
                or segment.fd == self._writing_fd
                or any(self._segment_of.get(entry_id) != sequence for entry_id in segment.unacked)
            ):
                continue
            for entry_id in segment.unacked:
                del self._segment_of[entry_id]
            dropped.extend(segment.unacked)
            segment.parked = len(segment.unacked)
            self._parked_total += segment.parked
            segment.unacked = set()
            os.close(segment.fd)
            segment.fd = -1
        if dropped:
            log.warning(
                "usage journal: %d records parked on disk only (%d held); read back as the ledger takes them",
                self.parked(),
                self.held(),
            )
        return dropped

    def oldest_parked(self) -> Path | None:
        parked = [sequence for sequence, segment in self._segments.items() if segment.is_parked]
        return self._segments[min(parked)].path if parked else None

    def unpark(self, path: Path, data: bytes) -> list[JournalEntry]:
        """The unacknowledged entries of parked segment `path` (its bytes `data`, read off the loop), held
        again, oldest first; an entry held meanwhile from another segment is left to that one."""
        sequence = int(path.stem.removeprefix("usage-"))
        segment = self._segments.get(sequence)
        if segment is None or not segment.is_parked:
            return []  # read back meanwhile
        latest: dict[str, tuple[int, dict[str, Any]]] = {}
        written = self._read_lines(data, path, sequence, latest, [])
        segment.fd = os.open(path, os.O_WRONLY)
        self._parked_total -= segment.parked
        segment.size, segment.parked = len(written), 0
        if written and not written.endswith(b"\n"):
            _write_all(segment.fd, b"\n", segment.reserve(1))
        entries = []
        for entry_id, (_, record) in latest.items():
            held_in = self._segment_of.get(entry_id)
            if held_in is not None and held_in > sequence:
                continue  # a later line of it is held: that one stands
            if held_in is not None:  # an earlier line (a stream's stand-in) is held: this one replaces it
                self._end_earlier_line(entry_id, held_in)
            segment.unacked.add(entry_id)
            self._segment_of[entry_id] = sequence
            entries.append(JournalEntry(entry_id, record))
        self._delete_if_done(sequence)
        return entries

    def set_aside(self, path: Path) -> None:
        """A parked segment that cannot be read back: left on disk (a restart reads it again), not retried."""
        segment = self._segments.pop(int(path.stem.removeprefix("usage-")), None)
        if segment is not None and segment.is_parked:
            self._parked_total -= segment.parked

    # --- acknowledging -------------------------------------------------------------------------------

    def ack(self, *entry_ids: str) -> None:
        """The ledger holds these entries' records; they are not sent again, not even after a restart.
        One write per segment for all of them (a batch's acks are one syscall, not one each)."""
        lines: dict[int, list[bytes]] = {}
        for entry_id in entry_ids:
            self._stand_ins.discard(entry_id)
            sequence = self._segment_of.pop(entry_id, None)
            if sequence is not None:
                self._segments[sequence].unacked.discard(entry_id)
                lines.setdefault(sequence, []).append(_line({"ack": entry_id}))
        for sequence, acks in lines.items():
            segment = self._segments[sequence]
            data = b"".join(acks)
            _write_all(segment.fd, data, segment.reserve(len(data)))
            self._delete_if_done(sequence)

    def _delete_if_done(self, sequence: int) -> None:
        segment = self._segments.get(sequence)
        if segment is None or segment.unacked or segment.is_parked or sequence == self._current:
            return
        del self._segments[sequence]
        self._dirty.pop(segment.fd, None)  # deleted: nothing of it needs a sync
        os.close(segment.fd)
        segment.path.unlink(missing_ok=True)

    def segment_count(self) -> int:
        return len(self._segments)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        if self._aio is not None:  # waits for a sync still in flight (the writer's, were it cancelled)
            self._aio.close()
            self._aio = None
        for fd in self._dirty:  # on disk for the next start, which hands its records on
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.error("usage journal: the last sync failed (%s)", exc)
        self._dirty.clear()
        for segment in self._segments.values():
            if not segment.is_parked:
                os.close(segment.fd)
        self._segments.clear()
