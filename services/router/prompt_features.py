"""Cheap features of a prompt's raw text for the Router's classifier: cue expressions counted per task
type and per difficulty group, and the prompt's shape (length, lines, code, tables, numbers, how many
sentences and clauses its instruction has).

Everything here reads at most MAX_FEATURE_CHARS of text, so a huge prompt costs no more than a long one.
"""

from __future__ import annotations

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


def _literal_run(items) -> str:
    """The longest run of literal characters in a parsed regex sequence (zero-width anchors kept)."""
    best = run = ""
    for op, value in items:
        if op is _sre.LITERAL:
            run += chr(value).lower()
        elif op is not _sre.AT:
            best, run = max(best, run, key=len), ""
    return max(best, run, key=len)


def _required_literals(pattern: re.Pattern[str]) -> tuple[str, ...] | None:
    """Lowercase strings one of which every match must contain, or None when they cannot be told.

    A cue is only searched for in a text that contains one of them: `in` on a string is far cheaper
    than a regex scan, and most cues are absent from most prompts."""
    try:
        items = list(_sre_parse(pattern.pattern, pattern.flags))
    except Exception:  # a private parser: without it, every cue is simply searched
        return None
    # Zero-width anchors around an alternation (the parser factors a common `\\b` out of its branches).
    core = [item for item in items if item[0] is not _sre.AT]
    while len(core) == 1 and core[0][0] is _sre.SUBPATTERN:
        core = [item for item in core[0][1][-1] if item[0] is not _sre.AT]
    if len(core) == 1 and core[0][0] is _sre.BRANCH:
        literals = tuple(_literal_run(list(branch)) for branch in core[0][1][1])
    else:
        literals = (_literal_run(items),)
    return literals if all(literals) else None


class CueCounter:
    """Counts, per group, how many of the group's cue expressions occur in a text."""

    def __init__(self, groups: Sequence[Sequence[re.Pattern[str]]]) -> None:
        self.size = len(groups)
        self._cues = [(group, cue) for group, cues in enumerate(groups) for cue in cues]
        # A cue is searched only in texts holding one of its literals (those without any: always).
        self._by_literal: dict[str, list[int]] = {}
        self._always: list[int] = []
        for index, (_, cue) in enumerate(self._cues):
            literals = _required_literals(cue)
            if literals is None:
                self._always.append(index)
            for literal in literals or ():
                self._by_literal.setdefault(literal, []).append(index)

    def __call__(self, text: str) -> list[int]:
        lowered = text.lower()
        candidates = set(self._always)
        for literal, indices in self._by_literal.items():
            if literal in lowered:
                candidates.update(indices)
        counts = [0] * self.size
        for index in candidates:
            group, cue = self._cues[index]
            if cue.search(text):
                counts[group] += 1
        return counts


class TextFeatures:
    """The features of a prompt (and its context: system prompt and earlier turns), in two blocks the
    classifier weighs separately: the task block (task cues, shape) and the difficulty block
    (difficulty cue groups, the instruction's sentences and clauses)."""

    def __init__(
        self,
        task_cues: Sequence[Sequence[re.Pattern[str]]],
        difficulty_cues: Sequence[Sequence[re.Pattern[str]]] = (),
    ) -> None:
        self._task_cues = CueCounter(task_cues)
        self._difficulty_cues = CueCounter(difficulty_cues)
        # Task cues in the head, the prompt and the context, then 9 shape features.
        self.task_size = 3 * len(task_cues) + 9
        # Difficulty cues in the prompt and in its instruction, then sentences and commas there.
        self.difficulty_size = 2 * len(difficulty_cues) + 2

    def task_cue_counts(self, text: str) -> list[int]:
        return self._task_cues(text)

    def difficulty_cue_counts(self, text: str) -> list[int]:
        return self._difficulty_cues(text)

    def __call__(self, prompt: str, context: str) -> list[float]:
        """task_size task features, then difficulty_size difficulty features."""
        prompt = prompt[:MAX_FEATURE_CHARS]
        context = context[:MAX_FEATURE_CHARS]
        words = prompt.split()
        head = " ".join(words[:HEAD_WORDS])
        instruction = " ".join(words[:INSTRUCTION_WORDS])
        cues = self._task_cues(head) + self._task_cues(prompt) + self._task_cues(context)
        non_ascii = sum(1 for c in prompt if ord(c) > 127) / max(len(prompt), 1)
        shape = [
            math.log1p(len(words)),
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
        difficulty = self._difficulty_cues(prompt) + self._difficulty_cues(instruction)
        return [math.log1p(c) for c in cues] + shape + [math.log1p(c) for c in difficulty] + instruction_shape
