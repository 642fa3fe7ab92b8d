"""Cheap features of a prompt's raw text for the Router's classifier: cue expressions counted per task
type and per difficulty group, and the prompt's shape (length, lines, code, tables, numbers, how many
sentences and clauses its instruction has).

Everything here reads at most MAX_FEATURE_CHARS of text, so a huge prompt costs no more than a long one.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from re import _constants as _sre
from re._parser import parse as _sre_parse

# The instruction usually sits in the first words; pasted material follows.
HEAD_WORDS = 40
# The instruction's shape (sentences, clauses, difficulty cues) is read over a slightly longer head: a
# request with many constraints spells them out before the pasted material starts.
INSTRUCTION_WORDS = 60
MAX_FEATURE_CHARS = 4000

_CODE = re.compile(
    r"```|^\s{2,}\S.*[;:{})]\s*$|\bdef \w+\(|=>|\bimport \w|\bSELECT\b.+\bFROM\b|^\s*\$ \w", re.M
)
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$|^[^,\n]+(?:,[^,\n]+){3,}$", re.M)
_CONSTRAINT = re.compile(
    r"\b(must|exactly|at most|at least|no more than|under \d+|within|only|without|never|strict|"
    r"words?|characters?|sentences?|bullets?|format|tone|register|each|explain why|trade-?offs?|"
    r"edge cases?|concurren\w*|secur\w*|invariants?|legal|prove|step by step)\b",
    re.I,
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"[.?!](?:\s|$)")
_NON_SPACE = re.compile(r"\S+")


def _literal_run(items) -> tuple[str, bool]:
    """A run of literal characters every match of a parsed regex sequence contains (zero-width anchors
    kept), and whether it starts the sequence: the leading run if there is one, else the longest."""
    runs, run = [], ""
    for op, value in items:
        if op is _sre.LITERAL:
            run += chr(value).lower()
        elif op is not _sre.AT:
            runs.append(run)
            run = ""
    runs.append(run)
    # The leading run when there is one: any run is required, and matches start with this one.
    if runs[0]:
        return runs[0], True
    return max(runs, key=len), False


def _required_literals(pattern: re.Pattern[str]) -> tuple[tuple[str, ...], bool] | None:
    """Lowercase strings one of which every match must contain, and whether every match starts with
    one of them; None when they cannot be told.

    A cue is only searched for in a text that contains one of them, from the first place one occurs
    when matches start with them: `find` on a string is far cheaper than a regex scan, and most cues
    are absent from most prompts."""
    try:
        items = list(_sre_parse(pattern.pattern, pattern.flags))
    except Exception:  # a private parser: without it, every cue is simply searched
        return None
    # Zero-width anchors around an alternation (the parser factors a common `\\b` out of its branches).
    sequence = items
    core = [item for item in sequence if item[0] is not _sre.AT]
    while len(core) == 1 and core[0][0] is _sre.SUBPATTERN:
        sequence = list(core[0][1][-1])
        core = [item for item in sequence if item[0] is not _sre.AT]
    if len(core) == 1 and core[0][0] is _sre.BRANCH:
        runs = [_literal_run(list(branch)) for branch in core[0][1][1]]
    else:
        runs = [_literal_run(sequence)]
    literals = tuple(run for run, _ in runs)
    return (literals, all(leads for _, leads in runs)) if all(literals) else None


class CueCounter:
    """Counts, per group, how many of the group's cue expressions occur in a text."""

    def __init__(self, groups: Sequence[Sequence[re.Pattern[str]]]) -> None:
        self.size = len(groups)
        self._cues = [(group, cue) for group, cues in enumerate(groups) for cue in cues]
        # A cue is searched only in texts holding one of its literals (those without any: always).
        self._by_literal: dict[str, list[int]] = {}
        self._always: list[int] = []
        self._literals: dict[int, tuple[str, ...]] = {}
        # Cues whose matches start with one of their literals: tried only where those occur.
        self._leading: set[int] = set()
        for index, (_, cue) in enumerate(self._cues):
            required = _required_literals(cue)
            if required is None:
                self._always.append(index)
                continue
            literals, leading = required
            self._literals[index] = literals
            if leading:
                self._leading.add(index)
            for literal in literals:
                self._by_literal.setdefault(literal, []).append(index)

    def __call__(self, text: str, prefix_chars: int = 0) -> tuple[list[int], list[int]]:
        """Per group: how many of its cues occur in the text, and how many occur in its first
        prefix_chars characters (a match starting there), from one search per cue."""
        counts = [0] * self.size
        prefix_counts = [0] * self.size
        if not text:  # most prompts come without context
            return counts, prefix_counts
        lowered = text.lower()
        # Lowercasing keeps positions unless a character lowers to several.
        aligned = len(lowered) == len(text)
        found: dict[str, int] = {}
        candidates = set(self._always)
        for literal, indices in self._by_literal.items():
            at = lowered.find(literal)
            if at >= 0:
                found[literal] = at
                candidates.update(indices)
        for index in candidates:
            group, cue = self._cues[index]
            if aligned and index in self._leading:
                match = self._first_match(cue, text, lowered, found, self._literals[index])
            else:
                match = cue.search(text)
            # The leftmost match: if any match starts in the prefix, this one does.
            if match:
                counts[group] += 1
                if match.start() < prefix_chars:
                    prefix_counts[group] += 1
        return counts, prefix_counts

    @staticmethod
    def _first_match(
        cue: re.Pattern[str], text: str, lowered: str, found: dict[str, int], literals: tuple[str, ...]
    ) -> re.Match[str] | None:
        """The leftmost match of a cue whose matches start with one of its literals: tried only where
        they occur (a scan would try every position, slowly, wherever a literal occurs but no match)."""
        starts = []
        for literal in literals:
            at = found.get(literal, -1)
            while at >= 0:
                starts.append(at)
                at = lowered.find(literal, at + 1)
        for at in sorted(starts):
            match = cue.match(text, at)
            if match:
                return match
        return None


def _word_ends(text: str, words: int) -> list[int]:
    """Where each of the text's first `words` words ends."""
    return [m.end() for m in itertools.islice(_NON_SPACE.finditer(text), words)]


class TextFeatures:
    """The features of a prompt (and its context: system prompt and earlier turns), in two blocks the
    classifier weighs separately: the task block (task cues, shape) and the difficulty block
    (difficulty cue groups, the instruction's sentences and clauses)."""

    def __init__(
        self,
        task_cues: Sequence[Sequence[re.Pattern[str]]],
        difficulty_cues: Sequence[Sequence[re.Pattern[str]]] = (),
    ) -> None:
        self.task_cues = CueCounter(task_cues)
        self.difficulty_cues = CueCounter(difficulty_cues)
        # Task cues in the head, the prompt and the context, then 9 shape features.
        self.task_size = 3 * len(task_cues) + 9
        # Difficulty cues in the prompt and in its instruction, then sentences and commas there.
        self.difficulty_size = 2 * len(difficulty_cues) + 2

    def __call__(self, prompt: str, context: str) -> list[float]:
        """task_size task features, then difficulty_size difficulty features."""
        prompt = prompt[:MAX_FEATURE_CHARS]
        context = context[:MAX_FEATURE_CHARS]
        # The head and the instruction are the prompt's first words, as typed.
        ends = _word_ends(prompt, max(HEAD_WORDS, INSTRUCTION_WORDS))
        head_end = ends[min(HEAD_WORDS, len(ends)) - 1] if ends else 0
        instruction_end = ends[min(INSTRUCTION_WORDS, len(ends)) - 1] if ends else 0
        instruction = prompt[:instruction_end]
        in_prompt, in_head = self.task_cues(prompt, head_end)
        in_context, _ = self.task_cues(context)
        non_ascii = (len(prompt) - len(prompt.encode("ascii", "ignore"))) / max(len(prompt), 1)
        shape = [
            math.log1p(len(prompt.split())),
            math.log1p(prompt.count("\n")),
            math.log1p(len(_CODE.findall(prompt))),
            math.log1p(len(_TABLE_ROW.findall(prompt))),
            math.log1p(len(_CONSTRAINT.findall(prompt))),
            math.log1p(len(_NUMBER.findall(prompt))),
            math.log1p(prompt.count("?")),
            non_ascii,
            math.log1p(len(context.split())),
        ]
        # How many things the instruction asks for: its sentences and clauses.
        instruction_shape = [
            math.log1p(len(_SENTENCE_END.findall(instruction)) + 1),
            math.log1p(instruction.count(",")),
        ]
        hints, instruction_hints = self.difficulty_cues(prompt, instruction_end)
        cues = in_head + in_prompt + in_context
        difficulty = hints + instruction_hints
        return [math.log1p(c) for c in cues] + shape + [math.log1p(c) for c in difficulty] + instruction_shape
