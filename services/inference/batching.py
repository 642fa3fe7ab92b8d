"""Continuous batching: one stepping loop per model, one forward pass per step for every running sequence.

A sequence is WAITING (queued, nothing reserved), then PREFILLING (admitted: it holds KV tokens and a row
of the cache while its prompt goes in), then DECODING (one new token per step) until it FINISHES. Joining
and leaving happen only at step boundaries, so a finished, stopped, cancelled or expired sequence frees its
row and its tokens before the next forward pass, and a waiting one can take them in the same boundary.

Admission is by memory, not by count: the cache holds every running row as long as the longest
reservation (prompt + max_tokens) among them, so a set of sequences fits while the cells the cache must
then allocate (rows, padded as a decode step pads them, × longest reservation, rounded up as decode reads
it; see `_footprint`) stay within `kv_token_budget` (and rows ≤ `max_batch_size`). The cache rounds its
growth up only within that budget, so the budget bounds the memory. Requests that do not fit wait in a
bounded queue, first come first served; beyond it they are refused at once.

Prefill is packed (kv_cache.py) and gathered adaptively: with nothing decoding it runs at once; while
sequences decode, joiners wait at most `max_prefill_wait` so that several share one prefill pass instead
of each stalling the running batch with its own. Long prompts go in chunks of `max_prefill_tokens` per
step, between decode steps, so they never freeze the running streams for long, and a shorter prompt
goes ahead of a long one's next chunk. Cancels and deadlines take effect between chunks (step boundaries).

The loop runs on its own thread. It hands events out through `publish`, once per step for all sequences.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from libs.errors import DeadlineExceeded, ServiceError, Unavailable
from services.inference import metrics
from services.inference.attention import DensePlan, PackedPlan, Segment, use_batch_invariant_attention
from services.inference.engine import ChatModel
from services.inference.kv_cache import SlotKVCache
from services.inference.sampling import GenerationParams, Sampler, choose_tokens
from services.inference.text import FinishReason, GenerationEvent, TextOutput

log = logging.getLogger(__name__)


class Overloaded(Unavailable):
    """The waiting queue is full: refused at once, so the caller can go elsewhere instead of waiting."""


class ExceedsKvBudget(ServiceError):
    """The request alone needs more KV tokens than this server may ever hold; another model may take it."""

    code = grpc.StatusCode.OUT_OF_RANGE


class SequenceState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int
    kv_token_budget: int
    max_waiting: int
    max_prefill_wait_seconds: float
    max_prefill_tokens: int
    # Pad every product so that no sequence's answer depends on what shares its batch (see _padded_rows).
    batch_invariant: bool = True


# What the loop hands out after each step: (listener, event or error), in order, for every sequence.
Publish = Callable[[list[tuple[object, GenerationEvent | ServiceError]]], None]


class Sequence:
    """One generation request as the loop tracks it. `listener` is the caller's, passed back by publish."""

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        output: TextOutput,
        sampler: Sampler,
        listener: object,
        deadline: float | None = None,
    ) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.output = output
        self.sampler = sampler
        self.listener = listener
        self.deadline = deadline  # time.monotonic() value
        self.reservation = len(prompt_token_ids) + params.max_tokens  # KV tokens it may come to hold
        self.state = SequenceState.WAITING
        self.cancel_requested = False
        self.row: int | None = None
        self.cached = 0  # tokens of this sequence in the KV cache
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.passed_over = False  # a prefill pass left its prompt's next chunk out for shorter ones
        self.submitted_at = time.monotonic()
        self.last_token_at = 0.0

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_token_ids) - self.cached


@dataclass(frozen=True)
class BatchStats:
    running: int
    waiting: int
    kv_tokens_reserved: int


class ContinuousBatcher:
    def __init__(self, model: ChatModel, settings: BatchSettings, publish: Publish) -> None:
        self._model = model
        self._settings = settings
        self._publish = publish
        self._cache = SlotKVCache(
            model.model.config, model.device, model.torch_dtype, token_limit=settings.kv_token_budget
        )
        use_batch_invariant_attention(model.model)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # admitted, in admission order
        self._rows: list[Sequence] = []  # row r of the cache holds _rows[r]; decoding rows come first
        self._decoding_rows = 0
        self._events: list[tuple[object, GenerationEvent | ServiceError]] = []
        self._closing = False
        self._drain_deadline: float | None = None  # set on shutdown: answers must end before it
        self._step_seconds = 0.0  # recent duration of one step, to know when a drain must cut answers
        self._thread = threading.Thread(target=self._run, name=f"batcher-{model.id}", daemon=True)

    @property
    def settings(self) -> BatchSettings:
        return self._settings

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stops the loop after its current step; sequences still running or waiting get UNAVAILABLE."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def drain(self, deadline: float) -> None:
        """Shutting down: nothing new starts (the waiting are refused, so their callers can go elsewhere);
        the running go on, and if they cannot finish by `deadline` (time.monotonic()) they end with
        `length` just before it instead of being cut off."""
        with self._wake:
            self._drain_deadline = deadline
            self._wake.notify()

    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(len(self._running), len(self._waiting), self._footprint(self._running))

    # --- called from other threads -----------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        """Queues `sequence`; raises at once when it can never fit or the queue is full."""
        needed = self._footprint([sequence])
        if needed > self._settings.kv_token_budget:
            metrics.refused.add(1, {"reason": "kv_budget"})
            raise ExceedsKvBudget(
                f"options.max_tokens: the prompt ({len(sequence.prompt_token_ids)} tokens) plus "
                f"max_tokens ({sequence.params.max_tokens}) needs {needed} KV tokens as the cache holds "
                f"them, more than this server's budget of {self._settings.kv_token_budget}"
            )
        with self._wake:
            if self._closing or self._drain_deadline is not None:
                metrics.refused.add(1, {"reason": "shutting_down"})
                raise Unavailable("inference is shutting down")
            candidates = [*self._waiting, sequence]
            if len(candidates) - self._startable_locked(candidates) > self._settings.max_waiting:
                metrics.refused.add(1, {"reason": "queue_full"})
                raise Overloaded(
                    f"inference is at capacity ({len(self._running)} generations running, "
                    f"{len(self._waiting)} waiting)"
                )
            self._waiting.append(sequence)
            self._wake.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Ends `sequence` at the next step boundary (a no-op once it has finished)."""
        with self._wake:
            sequence.cancel_requested = True
            self._wake.notify()

    # --- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._next_boundary():
                started = time.perf_counter()
                try:
                    self._step()
                except Exception:  # a failed forward pass must not end the loop or strand the callers
                    log.exception("generation step failed; ending the sequences it held")
                    self._fail_running(Unavailable("the local model failed while generating"))
                self._step_seconds = 0.8 * self._step_seconds + 0.2 * (time.perf_counter() - started)
                self._flush_events()
        self._flush_events()

    def _next_boundary(self) -> bool:
        """Between two steps: ends what has to end, admits what fits; sleeps while there is nothing to
        do. False once the batcher closes."""
        with self._wake:
            while True:
                if self._closing:
                    self._end_all_locked(Unavailable("inference is shutting down"))
                    return False
                self._retire_locked()
                if self._drain_deadline is None:
                    self._admit_locked()
                else:
                    self._drain_locked()
                if self._running:
                    return True
                self._flush_events_locked()
                self._wake.wait(self._seconds_to_next_deadline())

    def _step(self) -> None:
        if self._prefill_due():
            self._prefill()
        if self._decoding_rows:
            self._decode()

    def _prefill_due(self) -> bool:
        pending = [s for s in self._running if s.state is SequenceState.PREFILLING]
        if not pending:
            return False
        if not self._decoding_rows or any(s.cached for s in pending):
            return True  # idle, or a long prompt is part-way in
        with self._lock:
            full = len(self._running) >= self._settings.max_batch_size or bool(self._waiting)
        oldest = min(s.submitted_at for s in pending)
        waited = time.monotonic() - oldest >= self._settings.max_prefill_wait_seconds
        enough = sum(s.prompt_left for s in pending) >= self._settings.max_prefill_tokens
        return full or waited or enough

    def _prefill(self) -> None:
        """One packed forward pass over the next prompt chunk of admitted sequences, in admission order.
        Sequences whose prompt is then complete get their first token."""
        started = time.perf_counter()
        chunks = self._prefill_chunks()
        pack = _Pack(chunks, self._padded)
        self._reserve(len(self._rows), pack.columns_needed)
        device = self._model.device
        self._cache.packed_step(pack.rows.to(device), pack.columns.to(device))
        completed = [sequence for sequence, taken in chunks if taken == sequence.prompt_left]
        last_tokens = self._padded(pack.last_token_indices)
        logits = self._model.model(
            input_ids=pack.token_ids[None].to(device),
            position_ids=pack.positions[None].to(device),
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=torch.tensor(last_tokens, dtype=torch.long, device=device),
            attention_plan=PackedPlan(pack.segments),
        ).logits[0]
        for sequence, taken in chunks:
            sequence.cached += taken
        metrics.prefill_tokens.add(pack.prompt_tokens)
        metrics.prefill_seconds.record(time.perf_counter() - started)

        if not completed:
            return
        tokens = choose_tokens(logits[: len(completed)], [s.sampler for s in completed])
        now = time.monotonic()
        for sequence, token in zip(completed, tokens, strict=True):
            metrics.time_to_first_token.record(now - sequence.submitted_at)
            sequence.last_token_at = now
            self._emit(sequence, token)
            if sequence.state is not SequenceState.FINISHED:
                self._start_decoding(sequence)

    def _prefill_chunks(self) -> list[tuple[Sequence, int]]:
        """(sequence, prompt tokens it takes now) for this pass, and a row for the newly admitted.

        A prompt goes in chunks of max_prefill_tokens counted from its own start, and a pass takes whole
        chunks (at least one, then as many more as fit in max_prefill_tokens): a prompt is then cut the
        same way whatever else is admitted with it, which keeps its answer the same batched or alone.
        Prompts that end within this chunk go first, so that a short prompt admitted behind a long one
        waits for one of its chunks, not for all of them; a prompt left out once goes first next time,
        so a stream of short ones never starves a long one."""
        limit = self._settings.max_prefill_tokens
        pending = [s for s in self._running if s.state is SequenceState.PREFILLING]
        pending.sort(key=lambda s: (not s.passed_over, s.prompt_left > limit))
        chunks: list[tuple[Sequence, int]] = []
        total = 0
        for sequence in pending:
            taken = min(sequence.prompt_left, limit)
            if chunks and total + taken > limit:
                break
            if sequence.row is None:
                self._place(sequence)
            chunks.append((sequence, taken))
            total += taken
        chosen = {id(sequence) for sequence, _ in chunks}
        for sequence in pending:
            sequence.passed_over = id(sequence) not in chosen
        return chunks

    def _decode(self) -> None:
        """One forward pass that feeds every decoding row its newest token and samples the next."""
        started = time.perf_counter()
        decoding = self._rows[: self._decoding_rows]
        rows = self._padded(list(range(len(decoding))))
        # Padding rows write at their own length, a column nothing has read yet.
        columns = torch.tensor([self._rows[r].cached if r < len(self._rows) else 0 for r in range(len(rows))])
        # The view is as long as the longest row, rounded up so that its length never shows in a result.
        kv_length = -(-(int(columns.max()) + 1) // _INVARIANT_KV_GRANULE) * _INVARIANT_KV_GRANULE
        self._reserve(max(len(rows), len(self._rows)), kv_length)
        device = self._model.device
        columns = columns.to(device)
        self._cache.dense_step(columns, kv_length)
        token_ids = [s.next_token for s in decoding] + [0] * (len(rows) - len(decoding))
        logits = self._model.model(
            input_ids=torch.tensor(token_ids, device=device)[:, None],
            position_ids=columns[:, None],
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
            attention_plan=DensePlan(columns + 1),
        ).logits[: len(decoding), -1]
        tokens = choose_tokens(logits, [s.sampler for s in decoding])
        now = time.monotonic()
        for sequence, token in zip(decoding, tokens, strict=True):
            sequence.cached += 1
            metrics.inter_token_latency.record(now - sequence.last_token_at)
            sequence.last_token_at = now
            self._emit(sequence, token)
        metrics.decode_batch_size.record(len(decoding))
        metrics.decode_tokens.add(len(decoding))
        metrics.decode_seconds.record(time.perf_counter() - started)

    def _padded(self, items: list[int]) -> list[int]:
        return _padded_rows(items) if self._settings.batch_invariant else items

    def _emit(self, sequence: Sequence, token: int) -> None:
        """Hands out the event for a sequence's new token; the token is fed to the model next step."""
        sequence.next_token = token
        event = sequence.output.push(token)
        self._events.append((sequence.listener, event))
        if event.finish_reason is not None:
            sequence.state = SequenceState.FINISHED

    # --- rows --------------------------------------------------------------------------------------

    def _place(self, sequence: Sequence) -> None:
        sequence.row = len(self._rows)
        self._rows.append(sequence)

    def _start_decoding(self, sequence: Sequence) -> None:
        """Moves a sequence whose prompt is in to the end of the decoding rows, which come first."""
        sequence.state = SequenceState.DECODING
        self._swap(sequence.row, self._decoding_rows)
        self._decoding_rows += 1

    def _remove_row(self, sequence: Sequence) -> None:
        """Frees the row of a sequence that leaves, keeping rows dense: decoding ones first, then the rest.
        The last decoding row fills the hole, and the last row overall fills the one that leaves."""
        hole = sequence.row
        if hole < self._decoding_rows:
            self._decoding_rows -= 1
            self._move(self._decoding_rows, hole)
            hole = self._decoding_rows
        self._move(len(self._rows) - 1, hole)
        self._rows.pop()
        sequence.row = None

    def _move(self, source: int, destination: int) -> None:
        if source == destination:
            return
        moved = self._rows[source]
        self._cache.move_row(source, destination, moved.cached)
        self._rows[destination] = moved
        moved.row = destination

    def _swap(self, first: int, second: int) -> None:
        if first == second:
            return
        a, b = self._rows[first], self._rows[second]
        self._cache.swap_rows(first, second, max(a.cached, b.cached))
        self._rows[first], self._rows[second] = b, a
        a.row, b.row = second, first

    def _reserve(self, rows: int, columns: int) -> None:
        """Room for a step that needs `rows` × `columns`, keeping every row's cells (the cache may drop
        capacity beyond what it is asked for to stay within the budget)."""
        kept = max((s.cached + 1 for s in self._rows), default=0)
        self._cache.reserve(max(rows, len(self._rows)), max(columns, kept))

    # --- boundaries (under the lock) ---------------------------------------------------------------

    def _retire_locked(self) -> None:
        """Ends finished, cancelled and expired sequences, running or waiting, and frees what they held."""
        now = time.monotonic()
        for sequence in list(self._waiting):
            ending = self._ending(sequence, now)
            if ending is not None:
                self._waiting.remove(sequence)
                sequence.state = SequenceState.FINISHED
                self._events.append((sequence.listener, ending))
        leaving = []
        for sequence in self._running:
            if sequence.state is not SequenceState.FINISHED:
                ending = self._ending(sequence, now)
                if ending is None:
                    continue
                sequence.state = SequenceState.FINISHED
                self._events.append((sequence.listener, ending))
            leaving.append(sequence)
        for sequence in leaving:
            self._running.remove(sequence)
            if sequence.row is not None:
                self._remove_row(sequence)
        if leaving:
            needed = max((s.cached + 1 for s in self._rows), default=0)
            self._cache.shrink(len(self._rows), needed)

    def _ending(self, sequence: Sequence, now: float) -> GenerationEvent | ServiceError | None:
        if sequence.cancel_requested:
            return sequence.output.end(FinishReason.CANCELLED)
        if sequence.deadline is not None and now >= sequence.deadline:
            return DeadlineExceeded(
                f"the deadline passed after {sequence.output.completion_tokens} generated tokens"
            )
        return None

    def _drain_locked(self) -> None:
        """Refuses the waiting, and the admitted whose prompt is not all in yet: a prefill pass cannot be
        cut short, so one more could outlast the deadline, and these have answered nothing yet (so the
        Gateway can go elsewhere). Ends the decoding with `length` once one more step might miss it."""
        prefilling = [s for s in self._running if s.state is SequenceState.PREFILLING]
        if self._waiting or prefilling:
            metrics.refused.add(len(self._waiting) + len(prefilling), {"reason": "shutting_down"})
        for sequence in [*self._waiting, *prefilling]:
            sequence.state = SequenceState.FINISHED
            self._events.append((sequence.listener, Unavailable("inference is shutting down")))
        self._waiting.clear()
        if prefilling:
            self._retire_locked()
        if time.monotonic() + 2 * self._step_seconds < self._drain_deadline:
            return
        for sequence in self._running:
            if sequence.state is not SequenceState.FINISHED:
                sequence.state = SequenceState.FINISHED
                self._events.append((sequence.listener, sequence.output.end(FinishReason.LENGTH)))
        self._retire_locked()

    def _admit_locked(self) -> None:
        for _ in range(self._startable_locked(list(self._waiting))):
            sequence = self._waiting.popleft()
            sequence.state = SequenceState.PREFILLING
            self._running.append(sequence)

    def _startable_locked(self, candidates: list[Sequence]) -> int:
        """How many of `candidates`, first come first served, fit beside the running sequences now."""
        together = list(self._running)
        for count, sequence in enumerate(candidates):
            together.append(sequence)
            too_many = len(together) > self._settings.max_batch_size
            if too_many or self._footprint(together) > self._settings.kv_token_budget:
                return count
        return len(candidates)

    def _footprint(self, sequences: list[Sequence]) -> int:
        """KV tokens the dense cache must allocate for these sequences at most: every row as long as the
        longest reservation, that rounded up as decode steps read it (_INVARIANT_KV_GRANULE), and as many
        rows as a decode step of all of them writes (padded, see _padded_rows). Counted as allocated, not
        as used, so that the budget bounds the memory (the cache never rounds beyond the budget)."""
        if not sequences:
            return 0
        rows = len(self._padded(list(range(len(sequences)))))
        longest = max(s.reservation for s in sequences)
        return rows * -(-longest // _INVARIANT_KV_GRANULE) * _INVARIANT_KV_GRANULE

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines = [s.deadline for s in self._waiting if s.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _fail_running(self, error: ServiceError) -> None:
        with self._lock:
            for sequence in self._running:
                if sequence.state is not SequenceState.FINISHED:
                    sequence.state = SequenceState.FINISHED
                    self._events.append((sequence.listener, error))
            self._running.clear()
            self._rows.clear()
            self._decoding_rows = 0
            self._cache.shrink(0, 0)

    def _end_all_locked(self, error: ServiceError) -> None:
        for sequence in [*self._running, *self._waiting]:
            if sequence.state is not SequenceState.FINISHED:
                sequence.state = SequenceState.FINISHED
                self._events.append((sequence.listener, error))
        self._running.clear()
        self._waiting.clear()
        self._rows.clear()
        self._decoding_rows = 0

    def _flush_events(self) -> None:
        with self._lock:
            self._flush_events_locked()

    def _flush_events_locked(self) -> None:
        if self._events:
            events, self._events = self._events, []
            self._publish(events)


# A sequence's answer must not depend on what shares its batch. Measured properties of the CPU's matrix
# products decide the shapes; tests/unit/test_inference_batching.py checks that every logit comes out
# bitwise the same batched and alone. With oneDNN-packed weights (packed_linear.py) a one-row product rounds
# differently from products of two or more rows; with MKL's plain sgemm, products of 1-3, 5-7 and 9-11 rows
# take small-matrix kernels that round differently from the general one. So products are padded to 4, 8 or
# 12 rows, which suits both (with batch_invariant; with packed weights it costs nothing measurable, with
# plain ones a lone decode step is about 50 % slower). And a decode step's attention rounds differently when
# the row's length is not a multiple of 16 (a tail loop), so the dense view's length is rounded up to a
# multiple of this granule; the padding is masked.
_INVARIANT_ROW_COUNTS = (4, 8, 12)
_INVARIANT_KV_GRANULE = 64


def _padded_rows(items: list[int]) -> list[int]:
    """`items` extended (repeating its last) to a row count whose products round like any other's."""
    needed = next((count for count in _INVARIANT_ROW_COUNTS if count >= len(items)), len(items))
    return items + [items[-1] if items else 0] * (needed - len(items))


class _Pack:
    """The prompt chunks of one prefill pass as one sequence of tokens: ids, positions, the cache cell
    (row, column) each writes, one attention segment per chunk, and the index of each completed prompt's
    last token. Dummy tokens pad the pack (see _padded_rows); all of them write the one cell just past the
    last chunk, which that row rewrites before it ever reads it, and read the row's first cells: so a pack
    needs no column beyond its prompts (the KV budget counts none)."""

    def __init__(self, chunks: list[tuple[Sequence, int]], padded: Callable[[list[int]], list[int]]) -> None:
        token_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        columns: list[int] = []
        segments: list[Segment] = []
        self.last_token_indices: list[int] = []
        for sequence, taken in chunks:
            start = len(token_ids)
            token_ids += sequence.prompt_token_ids[sequence.cached : sequence.cached + taken]
            positions += range(sequence.cached, sequence.cached + taken)
            columns += range(sequence.cached, sequence.cached + taken)
            rows += [sequence.row] * taken
            segments.append(Segment(start, len(token_ids), sequence.row, sequence.cached))
            if taken == sequence.prompt_left:
                self.last_token_indices.append(len(token_ids) - 1)
        self.prompt_tokens = len(token_ids)
        dummies = len(padded(token_ids)) - len(token_ids)
        if dummies:
            next_column = columns[-1] + 1
            segments.append(Segment(len(token_ids), len(token_ids) + dummies, rows[-1], 0))
            token_ids += [0] * dummies
            positions += range(dummies)
            columns += [next_column] * dummies
            rows += [rows[-1]] * dummies
        self.token_ids = torch.tensor(token_ids)
        self.positions = torch.tensor(positions)
        self.columns = torch.tensor(columns)
        self.rows = torch.tensor(rows)
        self.segments = tuple(segments)
        self.columns_needed = max(max(columns) + 1, dummies)
