"""From generated token ids to the text a client sees: UTF-8-safe deltas, stop strings, finish reasons.

Every generation, batched or alone, owns one `TextOutput`; the stepping loop feeds it one token at a time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model ended its answer, or a stop string appeared
    LENGTH = "length"  # max_tokens reached (or the server is shutting down and cut the answer short)
    CANCELLED = "cancelled"  # the client went away


@dataclass
class GenerationEvent:
    text: str  # new text since the previous event; may be empty
    finish_reason: FinishReason | None  # None while generating
    prompt_tokens: int
    completion_tokens: int


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    A byte-level BPE token can hold part of a multi-byte character, and decoding it alone gives U+FFFD. Text
    is therefore only released once the decoded window no longer ends in U+FFFD. Decoding a short window that
    starts a few tokens back, rather than the newest token alone, keeps leading spaces and merges right.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._prefix_offset = 0  # start of the window re-decoded for context
        self._read_offset = 0  # end of the text already released

    def push(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        released = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._token_ids))
        if len(window) <= len(released) or window.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return window[len(released) :]

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters included; called once generation ends."""
        released = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._token_ids))
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return window[len(released) :]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._token_ids[start:end], skip_special_tokens=True)


class StopStringFilter:
    """Holds back text that could be the start of a stop string, and cuts the output where one appears."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._text = ""
        self._released = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns the text that is now safe to release; sets `stopped` once a stop string has appeared."""
        if not self._stop:
            return delta
        self._text += delta
        # A stop string can straddle deltas, but never starts inside released text: that text was released
        # because no stop string could begin there.
        hits = [i for i in (self._text.find(stop, self._released) for stop in self._stop) if i != -1]
        if hits:
            self.stopped = True
            return self._release_until(min(hits))
        return self._release_until(len(self._text) - self._partial_stop_suffix_length())

    def flush(self) -> str:
        return self._release_until(len(self._text))

    def _partial_stop_suffix_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release_until(self, end: int) -> str:
        released = self._text[self._released : end]
        self._released = end
        return released


class TextOutput:
    """One generation's output: each new token becomes an event, the last one carrying the finish reason.

    The token that ends the answer (end-of-sequence) is counted as a completion token but adds no text; a
    stop string ends the answer with the text before it; reaching `max_tokens` ends it with `length`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: frozenset[int],
        prompt_tokens: int,
        max_tokens: int,
        stop: tuple[str, ...],
    ) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop_filter = StopStringFilter(stop)
        self._eos_token_ids = eos_token_ids
        self._max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def push(self, token_id: int) -> GenerationEvent:
        """The event for one newly generated token; its `finish_reason` is set when the answer ends here."""
        self.completion_tokens += 1
        if token_id in self._eos_token_ids:
            return self.end(FinishReason.STOP)
        text = self._stop_filter.feed(self._decoder.push(token_id))
        if self._stop_filter.stopped:
            self.finish_reason = FinishReason.STOP
            return self._event(text)
        if self.completion_tokens >= self._max_tokens:
            return self.end(FinishReason.LENGTH, text)
        return self._event(text)

    def end(self, reason: FinishReason, text: str = "") -> GenerationEvent:
        """Ends the answer early or at its natural end. No stop string appeared, so the text held back in
        case it began one is released after all, and so are the bytes of an incomplete last character."""
        self.finish_reason = reason
        return self._event(text + self._stop_filter.flush() + self._decoder.flush())

    def _event(self, text: str) -> GenerationEvent:
        return GenerationEvent(text, self.finish_reason, self.prompt_tokens, self.completion_tokens)
