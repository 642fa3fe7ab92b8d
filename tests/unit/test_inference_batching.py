"""The stepping loop with the real chat model (CPU): batched answers equal answers alone, sequences join
and leave at step boundaries, admission by KV budget, bounded queue."""

from __future__ import annotations

import os
import pathlib
import threading
import time

import pytest
import torch

from libs.errors import DeadlineExceeded, ServiceError, Unavailable
from services.inference import batching
from services.inference.batching import (
    BatchSettings,
    ContinuousBatcher,
    ExceedsKvBudget,
    Overloaded,
    Sequence,
)
from services.inference.engine import CHAT_MODEL_ID, ChatModel, load_chat_model
from services.inference.sampling import GenerationParams, Sampler
from services.inference.text import FinishReason, GenerationEvent

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
QUESTIONS = [
    "What is the capital of France?",
    "Write a long story about a dragon who learns to sail.",
    "Name three colours.",
    "Explain in detail how photosynthesis works in plants, step by step, for a curious child.",
    "What is 2 + 2?",
    "Write a haiku about rain.",
]
WAIT = 300  # seconds; generous, the CPU is shared


@pytest.fixture(scope="module")
def chat_model() -> ChatModel:
    weights_dir = pathlib.Path(os.environ.get("SOPHIA_WEIGHTS_DIR") or REPO_ROOT / "var" / "models")
    return load_chat_model(CHAT_MODEL_ID, weights_dir, device="cpu")


class Listener:
    """Collects one sequence's events as the loop publishes them."""

    def __init__(self) -> None:
        self.events: list[GenerationEvent] = []
        self.error: ServiceError | None = None
        self.done = threading.Event()

    @property
    def text(self) -> str:
        return "".join(event.text for event in self.events)

    @property
    def last(self) -> GenerationEvent:
        return self.events[-1]

    def wait(self) -> Listener:
        assert self.done.wait(WAIT), "the sequence never finished"
        return self


def publish(events) -> None:
    for listener, event in events:
        if isinstance(event, ServiceError):
            listener.error = event
            listener.done.set()
        else:
            listener.events.append(event)
            if event.finish_reason is not None:
                listener.done.set()


@pytest.fixture
def batcher_factory(chat_model: ChatModel):
    started = []

    def start(**overrides) -> ContinuousBatcher:
        settings = {
            "max_batch_size": 32,
            "kv_token_budget": 32768,
            "max_waiting": 64,
            "max_prefill_wait_seconds": 0.0,
            "max_prefill_tokens": 2048,
            **overrides,
        }
        batcher = ContinuousBatcher(chat_model, BatchSettings(**settings), publish)
        batcher.start()
        started.append(batcher)
        return batcher

    yield start
    for batcher in started:
        batcher.close()


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def submit(
    batcher: ContinuousBatcher,
    model: ChatModel,
    question: str,
    params: GenerationParams,
    deadline: float | None = None,
) -> tuple[Listener, Sequence]:
    listener = Listener()
    prompt = model.prompt_token_ids(messages(question))
    sequence = Sequence(
        prompt, params, model.text_output(len(prompt), params), Sampler(params, "cpu"), listener, deadline
    )
    batcher.submit(sequence)
    return listener, sequence


def alone(batcher: ContinuousBatcher, model: ChatModel, question: str, params: GenerationParams) -> str:
    """The answer with nothing else in the batch (call it while the batcher is otherwise idle)."""
    return submit(batcher, model, question, params)[0].wait().text


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def answers_alone(batcher, model, questions, params) -> list[str]:
    return [alone(batcher, model, question, params) for question in questions]


def test_greedy_answers_are_the_same_batched_and_alone(chat_model, batcher_factory):
    batcher = batcher_factory()
    params = GenerationParams(max_tokens=16)
    expected = answers_alone(batcher, chat_model, QUESTIONS, params)
    listeners = [submit(batcher, chat_model, question, params)[0] for question in QUESTIONS]
    assert [listener.wait().text for listener in listeners] == expected
    assert len(set(expected)) == len(QUESTIONS)
    assert all(listener.last.finish_reason is not None for listener in listeners)


def test_every_logit_is_bitwise_the_same_batched_and_alone(chat_model, batcher_factory, monkeypatch):
    """Stronger than equal text: no rounding difference at all, so no near tie can ever flip."""
    seen: dict[Sampler, list[torch.Tensor]] = {}
    choose = batching.choose_tokens

    def recording_choose(logits, samplers):
        for row, sampler in zip(logits, samplers, strict=True):
            seen.setdefault(sampler, []).append(row.clone())
        return choose(logits, samplers)

    monkeypatch.setattr(batching, "choose_tokens", recording_choose)
    batcher = batcher_factory()
    params = GenerationParams(max_tokens=12)

    def logits_of(listener_and_sequence) -> list[torch.Tensor]:
        listener, sequence = listener_and_sequence
        listener.wait()
        return seen[sequence.sampler]

    alone_logits = [logits_of(submit(batcher, chat_model, question, params)) for question in QUESTIONS]
    first = [submit(batcher, chat_model, question, params) for question in QUESTIONS[:4]]
    wait_until(lambda: len(first[0][0].events) >= 3, "the first sequences to decode")
    later = [submit(batcher, chat_model, question, params) for question in QUESTIONS[4:]]
    batched_logits = [logits_of(pair) for pair in first + later]
    for question, alone_rows, batched_rows in zip(QUESTIONS, alone_logits, batched_logits, strict=True):
        assert len(alone_rows) == len(batched_rows), question
        assert all(torch.equal(a, b) for a, b in zip(alone_rows, batched_rows, strict=True)), question


def test_sequences_joining_mid_batch_get_the_same_answers(chat_model, batcher_factory):
    batcher = batcher_factory()
    long, short = GenerationParams(max_tokens=24), GenerationParams(max_tokens=10)
    expected = answers_alone(batcher, chat_model, QUESTIONS[1:3], long)
    expected += answers_alone(batcher, chat_model, QUESTIONS[3:5], short)
    first = [submit(batcher, chat_model, question, long)[0] for question in QUESTIONS[1:3]]
    wait_until(lambda: len(first[0].events) >= 5, "the first sequences to decode")
    joined = [submit(batcher, chat_model, question, short)[0] for question in QUESTIONS[3:5]]
    assert [listener.wait().text for listener in first + joined] == expected


def test_seeded_sampling_is_the_same_batched_and_alone(chat_model, batcher_factory):
    batcher = batcher_factory()
    seeded = GenerationParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    other_seed = GenerationParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    expected = alone(batcher, chat_model, QUESTIONS[1], seeded)
    listener = submit(batcher, chat_model, QUESTIONS[1], seeded)[0]
    second = submit(batcher, chat_model, QUESTIONS[1], other_seed)[0]
    greedy = GenerationParams(max_tokens=12)
    companions = [submit(batcher, chat_model, question, greedy)[0] for question in QUESTIONS[2:5]]
    assert listener.wait().text == expected
    assert second.wait().text != expected
    for companion in companions:
        companion.wait()


def test_stop_strings_and_max_tokens_are_each_sequences_own(chat_model, batcher_factory):
    batcher = batcher_factory()
    full = alone(batcher, chat_model, QUESTIONS[0], GenerationParams(max_tokens=20))
    stopped = submit(batcher, chat_model, QUESTIONS[0], GenerationParams(max_tokens=20, stop=(" Paris",)))[0]
    short = submit(batcher, chat_model, QUESTIONS[1], GenerationParams(max_tokens=3))[0]
    plain = submit(batcher, chat_model, QUESTIONS[0], GenerationParams(max_tokens=20))[0]
    assert stopped.wait().text == full[: full.index(" Paris")]
    assert stopped.last.finish_reason is FinishReason.STOP
    assert (short.wait().last.completion_tokens, short.last.finish_reason) == (3, FinishReason.LENGTH)
    assert plain.wait().text == full


def test_a_cancelled_sequence_leaves_and_frees_its_row_while_the_others_go_on(chat_model, batcher_factory):
    batcher = batcher_factory()
    params = GenerationParams(max_tokens=20)
    expected = answers_alone(batcher, chat_model, QUESTIONS[2:4], params)
    cancelled, sequence = submit(batcher, chat_model, QUESTIONS[1], GenerationParams(max_tokens=500))
    others = [submit(batcher, chat_model, question, params)[0] for question in QUESTIONS[2:4]]
    wait_until(lambda: len(cancelled.events) >= 3, "the sequence to decode")
    batcher.cancel(sequence)
    cancelled.wait()
    assert cancelled.last.finish_reason is FinishReason.CANCELLED
    assert cancelled.last.completion_tokens < 20
    wait_until(lambda: batcher.stats().running <= 2, "the cancelled sequence's row to be freed")
    assert [other.wait().text for other in others] == expected


def test_a_deadline_ends_a_sequence(chat_model, batcher_factory):
    batcher = batcher_factory()
    params = GenerationParams(max_tokens=10)
    expected = alone(batcher, chat_model, QUESTIONS[2], params)
    deadline = time.monotonic() + 1
    expiring = submit(batcher, chat_model, QUESTIONS[1], GenerationParams(max_tokens=500), deadline)[0]
    other = submit(batcher, chat_model, QUESTIONS[2], params)[0]
    assert isinstance(expiring.wait().error, DeadlineExceeded)
    assert "deadline" in expiring.error.message
    assert len(expiring.events) < 500
    assert other.wait().text == expected
    wait_until(lambda: batcher.stats().running == 0, "every row to be freed")


def test_admission_is_by_kv_budget_counted_as_allocated_and_the_rest_waits_its_turn(
    chat_model, batcher_factory
):
    params = GenerationParams(max_tokens=12)
    longest = max(len(chat_model.prompt_token_ids(messages(q))) for q in QUESTIONS[:5]) + params.max_tokens
    # What a decode step of 4 sequences allocates: 4 rows (the padded count) as long as the longest
    # reservation, rounded up to the granule decode steps read. A fifth would need 8 rows.
    budget = 4 * (-(-longest // batching._INVARIANT_KV_GRANULE) * batching._INVARIANT_KV_GRANULE)
    batcher = batcher_factory(kv_token_budget=budget)
    expected = answers_alone(batcher, chat_model, QUESTIONS[:5], params)
    listeners = [submit(batcher, chat_model, question, params)[0] for question in QUESTIONS[:5]]
    stats = batcher.stats()
    assert stats.running + stats.waiting == 5
    seen, allocated = [], []
    while not all(listener.done.is_set() for listener in listeners):
        seen.append(batcher.stats())
        rows, columns = batcher._cache.capacity
        allocated.append(rows * columns)
        time.sleep(0.005)
    assert max(s.running for s in seen) <= 4
    assert max(s.kv_tokens_reserved for s in seen) <= budget
    assert any(s.waiting for s in seen)
    # The budget bounds the memory really held, not a count that rounding up could double.
    assert max(allocated) <= budget
    assert [listener.text for listener in listeners] == expected


def test_beyond_the_queue_requests_are_refused_at_once(chat_model, batcher_factory):
    batcher = batcher_factory(max_batch_size=1, max_waiting=1)
    params = GenerationParams(max_tokens=200)
    running = [submit(batcher, chat_model, QUESTIONS[1], params) for _ in range(2)]  # one runs, one waits
    with pytest.raises(Overloaded, match="at capacity"):
        submit(batcher, chat_model, QUESTIONS[2], params)
    for _, sequence in running:
        batcher.cancel(sequence)


def test_a_request_larger_than_the_whole_budget_is_out_of_range(chat_model, batcher_factory):
    batcher = batcher_factory(kv_token_budget=100)
    with pytest.raises(ExceedsKvBudget, match="budget of 100") as refused:
        submit(batcher, chat_model, QUESTIONS[0], GenerationParams(max_tokens=90))
    assert refused.value.code.name == "OUT_OF_RANGE"


def test_long_prompts_go_in_chunks_and_get_the_same_answer_batched(chat_model, batcher_factory):
    batcher = batcher_factory(max_prefill_tokens=8)
    params = GenerationParams(max_tokens=10)
    expected = answers_alone(batcher, chat_model, QUESTIONS[2:5], params)
    listeners = [submit(batcher, chat_model, question, params)[0] for question in QUESTIONS[2:5]]
    assert [listener.wait().text for listener in listeners] == expected
    # Chunked or whole, the prompt gives the same answer (the same arithmetic, in other shapes, could
    # round differently; this pins that it does not flip a token here).
    whole = batcher_factory()
    assert answers_alone(whole, chat_model, QUESTIONS[2:5], params) == expected


def test_closing_ends_running_and_waiting_sequences_with_unavailable(chat_model, batcher_factory):
    batcher = batcher_factory(max_batch_size=1)
    params = GenerationParams(max_tokens=500)
    running = submit(batcher, chat_model, QUESTIONS[1], params)[0]
    waiting = submit(batcher, chat_model, QUESTIONS[2], params)[0]
    wait_until(lambda: running.events, "the first sequence to start")
    batcher.close()
    assert isinstance(running.wait().error, Unavailable) and isinstance(waiting.wait().error, Unavailable)
    with pytest.raises(Unavailable, match="shutting down"):
        submit(batcher, chat_model, QUESTIONS[0], params)


def test_draining_refuses_the_waiting_and_ends_the_running_with_length_in_time(chat_model, batcher_factory):
    batcher = batcher_factory(max_batch_size=1)
    running = submit(batcher, chat_model, QUESTIONS[1], GenerationParams(max_tokens=500))[0]
    waiting = submit(batcher, chat_model, QUESTIONS[2], GenerationParams(max_tokens=5))[0]
    wait_until(lambda: running.events, "the first sequence to start")
    batcher.drain(time.monotonic() + 2)
    assert isinstance(waiting.wait().error, Unavailable)
    with pytest.raises(Unavailable, match="shutting down"):
        submit(batcher, chat_model, QUESTIONS[0], GenerationParams(max_tokens=5))
    assert running.wait().last.finish_reason is FinishReason.LENGTH
    assert 1 <= running.last.completion_tokens < 500
    assert running.error is None


def test_a_drain_with_time_enough_lets_the_running_finish(chat_model, batcher_factory):
    batcher = batcher_factory()
    params = GenerationParams(max_tokens=8)
    expected = alone(batcher, chat_model, QUESTIONS[2], params)
    running = submit(batcher, chat_model, QUESTIONS[2], params)[0]
    wait_until(lambda: running.events, "the sequence to start")
    batcher.drain(time.monotonic() + 600)
    assert running.wait().text == expected
    assert running.last.finish_reason is FinishReason.LENGTH


def test_without_batch_invariance_every_sequence_still_completes(chat_model, batcher_factory):
    batcher = batcher_factory(batch_invariant=False)
    params = GenerationParams(max_tokens=6)
    listeners = [submit(batcher, chat_model, question, params)[0] for question in QUESTIONS[1:4]]
    for listener in listeners:
        assert listener.wait().error is None
        assert 1 <= listener.last.completion_tokens <= 6 and listener.text


LONG_REQUEST = "Repeat this list: " + " ".join(f"item{i}" for i in range(200))  # about 800 tokens


def test_a_short_prompt_goes_ahead_of_a_long_prompts_next_chunk(chat_model, batcher_factory):
    batcher = batcher_factory(max_prefill_tokens=64)
    one = GenerationParams(max_tokens=1)
    long, long_sequence = submit(batcher, chat_model, LONG_REQUEST, one)
    short = submit(batcher, chat_model, QUESTIONS[4], one)[0]
    short.wait()
    # It waited for one of the long prompt's chunks at most, not for all of them.
    assert not long.done.is_set() and long_sequence.prompt_left > 64
    assert long.wait().error is None and long.last.completion_tokens == 1


def test_draining_ends_a_prompt_still_going_in_with_unavailable(chat_model, batcher_factory):
    batcher = batcher_factory(max_prefill_tokens=64)
    long, long_sequence = submit(batcher, chat_model, LONG_REQUEST, GenerationParams(max_tokens=4))
    wait_until(lambda: long_sequence.cached > 0, "the long prompt's first chunk")
    # Time enough to finish, but no prefill pass starts once draining: it answered nothing yet, so the
    # Gateway can take it elsewhere rather than risk it being cut mid-pass.
    batcher.drain(time.monotonic() + 600)
    assert isinstance(long.wait().error, Unavailable) and not long.events
    assert long_sequence.prompt_left > 0
    wait_until(lambda: batcher.stats().running == 0, "its row to be freed")
