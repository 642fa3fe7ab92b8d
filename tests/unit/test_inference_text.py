"""Generated tokens to client text: UTF-8-safe deltas, stop strings, finish reasons (the real tokenizer)."""

import os
import pathlib

import pytest
from transformers import AutoTokenizer

from services.inference.text import FinishReason, IncrementalDecoder, StopStringFilter, TextOutput

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    weights_dir = pathlib.Path(os.environ.get("SOPHIA_WEIGHTS_DIR") or REPO_ROOT / "var" / "models")
    return AutoTokenizer.from_pretrained(weights_dir / "smollm2-135m-instruct", local_files_only=True)


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def output(tokenizer, max_tokens: int = 100, stop: tuple[str, ...] = ()) -> TextOutput:
    return TextOutput(tokenizer, frozenset({EOS}), prompt_tokens=7, max_tokens=max_tokens, stop=stop)


def test_incremental_decoding_never_splits_a_character(tokenizer):
    text = "Grüße aus Köln 😀 日本語のテキスト, and back to ASCII."
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(token_id) for token_id in token_ids(tokenizer, text)]
    assert "".join(deltas) + decoder.flush() == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert "" in deltas  # some tokens carried only part of a character


def test_stop_filter_catches_stop_strings_split_across_deltas():
    stop_filter = StopStringFilter(("STOP", "end."))
    released = [stop_filter.feed(delta) for delta in ["Go on ", "ST", "OP", " more"]]
    assert released == ["Go on ", "", "", ""] and stop_filter.stopped

    stop_filter = StopStringFilter(("STOP",))
    released = [stop_filter.feed(delta) for delta in ["a S", "T", "ing"]]
    assert released == ["a ", "", "STing"] and not stop_filter.stopped
    stop_filter = StopStringFilter(("STOP",))
    assert stop_filter.feed("and ST") == "and " and stop_filter.flush() == "ST"


def test_one_event_per_token_and_length_at_max_tokens(tokenizer):
    out = output(tokenizer, max_tokens=3)
    events = [out.push(token_id) for token_id in token_ids(tokenizer, "one two three four")[:3]]
    assert [e.completion_tokens for e in events] == [1, 2, 3]
    assert [e.finish_reason for e in events] == [None, None, FinishReason.LENGTH]
    assert "".join(e.text for e in events) == "one two three"
    assert all(e.prompt_tokens == 7 for e in events)


def test_end_of_sequence_is_counted_but_adds_no_text(tokenizer):
    out = output(tokenizer)
    events = [out.push(token_id) for token_id in [*token_ids(tokenizer, "Paris."), EOS]]
    assert events[-1].finish_reason is FinishReason.STOP
    assert events[-1].completion_tokens == len(events)
    assert "".join(e.text for e in events) == "Paris."


def test_a_stop_string_ends_the_answer_before_it(tokenizer):
    out = output(tokenizer, stop=(" three",))
    events = []
    for token_id in token_ids(tokenizer, "one two three four"):
        events.append(out.push(token_id))
        if events[-1].finish_reason is not None:
            break
    assert events[-1].finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events) == "one two"


def test_ending_early_releases_the_text_held_back(tokenizer):
    out = output(tokenizer, stop=("two three",))
    events = [out.push(token_id) for token_id in token_ids(tokenizer, "one two")]
    assert "".join(e.text for e in events) == "one "  # "two" may begin the stop string
    last = out.end(FinishReason.CANCELLED)
    assert (last.text, last.finish_reason, last.completion_tokens) == ("two", FinishReason.CANCELLED, 2)
