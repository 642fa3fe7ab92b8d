"""Task type and difficulty of a prompt, from its MiniLM embedding plus cheap text features.

Two linear models (multinomial logistic regression) learn from labelled example prompts at start-up
and on reload: one for the task type, one for the difficulty (`complex`: needs a strong model). Their
input is the prompt's embedding (the cache's, or computed once here) next to cheap features of the raw
text: each task type's cue expressions counted in the prompt's first words, in the whole prompt and in
the system prompt / earlier turns; length, lines, code, tables, numbers, constraint words.

Prediction is a few small matrix-vector products in numpy (the fitted weights are copied out of
scikit-learn), so it costs microseconds; the embedding is what costs.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from re import _constants as _sre
from re._parser import parse as _sre_parse

import numpy as np
import yaml
from sklearn.linear_model import LogisticRegression

# The instruction usually sits in the first words; pasted material follows.
HEAD_WORDS = 40
# Cheap features read at most this much text, so a huge prompt costs no more than a long one.
MAX_FEATURE_CHARS = 4000
# Weight of the hand-made features next to the unit-length embedding, for the task type and for the
# difficulty (which leans on shape: constraints, code, tables), chosen by cross-validation on the dev set.
FEATURE_WEIGHT = 0.25
DIFFICULTY_FEATURE_WEIGHT = 0.1
REGULARISATION_C = 4.0
DIFFICULTY_REGULARISATION_C = 16.0
# The nearest examples' vote, blended into both models' probabilities (cosine similarity, softmax-weighted).
NEIGHBOURS = 15
NEIGHBOUR_SHARPNESS = 10.0
NEIGHBOUR_WEIGHT = 0.25

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


class Difficulty(StrEnum):
    SIMPLE = "simple"
    COMPLEX = "complex"


class ExamplesError(Exception):
    """The examples are unusable; the message names the file, the entry and the problem."""


@dataclass(frozen=True)
class Example:
    text: str
    task_type: str
    difficulty: Difficulty
    # The system prompt and earlier turns, when the example has them.
    context: str = ""


@dataclass(frozen=True)
class ExampleSet:
    task_types: tuple[str, ...]
    cues: dict[str, tuple[re.Pattern[str], ...]]
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class Classification:
    task_type: str
    difficulty: Difficulty
    # The task type's probability.
    confidence: float
    # The difficulty model's probability that the prompt is complex.
    complex_probability: float


def _compile_cues(task_type: str, patterns: object, where: str) -> tuple[re.Pattern[str], ...]:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ExamplesError(f"{where}: task_types.{task_type}.cues: must be a list of regular expressions")
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern, re.I | re.M))
        except re.error as exc:
            raise ExamplesError(f"{where}: task_types.{task_type}.cues[{index}]: {exc}") from None
    return tuple(compiled)


def _difficulty(value: object, where: str) -> Difficulty:
    try:
        return Difficulty(value)
    except ValueError:
        raise ExamplesError(f"{where}: difficulty must be 'simple' or 'complex', got {value!r}") from None


def load_examples(path: str | pathlib.Path, extra_files: Sequence[str | pathlib.Path] = ()) -> ExampleSet:
    """The YAML examples file (task type → cues and examples) plus labelled JSON Lines files."""
    try:
        raw = yaml.safe_load(pathlib.Path(path).read_text())
    except OSError as exc:
        raise ExamplesError(f"cannot read examples file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ExamplesError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("task_types"), dict) or not raw["task_types"]:
        raise ExamplesError(f"{path}: task_types: must map each task type to its cues and examples")
    cues: dict[str, tuple[re.Pattern[str], ...]] = {}
    examples: list[Example] = []
    for task_type, entry in raw["task_types"].items():
        where = f"{path}: task_types.{task_type}"
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("examples"), list)
            or not entry["examples"]
        ):
            raise ExamplesError(f"{where}.examples: at least one example is needed")
        cues[task_type] = _compile_cues(task_type, entry.get("cues", []), str(path))
        for index, item in enumerate(entry["examples"]):
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("text"), str)
                or not item["text"].strip()
            ):
                raise ExamplesError(f"{where}.examples[{index}].text: must be a non-empty string")
            difficulty = _difficulty(item.get("difficulty"), f"{where}.examples[{index}]")
            examples.append(Example(item["text"], str(task_type), difficulty, str(item.get("context", ""))))
    task_types = tuple(cues)
    for extra in extra_files:
        examples.extend(_jsonl_examples(extra, set(task_types)))
    if len({e.difficulty for e in examples}) < 2:
        raise ExamplesError(f"{path}: examples of both difficulties are needed")
    return ExampleSet(task_types, cues, tuple(examples))


def conversation_parts(messages: Sequence[dict]) -> tuple[str, str]:
    """(last user message, everything before it joined) from an OpenAI-style message list."""
    texts = [(m.get("role", ""), m.get("content") or "") for m in messages]
    last = max((i for i, (role, _) in enumerate(texts) if role == "user"), default=len(texts) - 1)
    prompt = texts[last][1] if texts else ""
    context = "\n".join(content for _, content in texts[:last] if isinstance(content, str))
    return (prompt if isinstance(prompt, str) else ""), context


def _jsonl_examples(path: str | pathlib.Path, task_types: set[str]) -> list[Example]:
    examples = []
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError as exc:
        raise ExamplesError(f"cannot read examples file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExamplesError(f"{where}: invalid JSON: {exc}") from None
        if item.get("task_type") not in task_types:
            raise ExamplesError(f"{where}: task_type {item.get('task_type')!r} is not in the examples file")
        prompt, context = conversation_parts(item.get("messages") or [{"role": "user", "content": ""}])
        prompt = item.get("prompt") or prompt
        examples.append(
            Example(prompt, item["task_type"], _difficulty(item.get("difficulty"), where), context)
        )
    return examples


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


class TextFeatures:
    """Cheap features of the raw text: cue counts per task type and shape (length, code, tables...)."""

    def __init__(self, example_set: ExampleSet) -> None:
        self._tasks = len(example_set.task_types)
        # Every cue as (task index, pattern); a cue is searched only in texts holding one of its literals.
        self._cues = [(i, cue) for i, t in enumerate(example_set.task_types) for cue in example_set.cues[t]]
        self._by_literal: dict[str, list[int]] = {}
        self._always: list[int] = []
        for index, (_, cue) in enumerate(self._cues):
            literals = _required_literals(cue)
            if literals is None:
                self._always.append(index)
            for literal in literals or ():
                self._by_literal.setdefault(literal, []).append(index)

    def _cue_counts(self, text: str) -> list[int]:
        lowered = text.lower()
        candidates = set(self._always)
        for literal, indices in self._by_literal.items():
            if literal in lowered:
                candidates.update(indices)
        counts = [0] * self._tasks
        for index in candidates:
            task, cue = self._cues[index]
            if cue.search(text):
                counts[task] += 1
        return counts

    def __call__(self, prompt: str, context: str) -> np.ndarray:
        prompt = prompt[:MAX_FEATURE_CHARS]
        context = context[:MAX_FEATURE_CHARS]
        words = prompt.split()
        head = " ".join(words[:HEAD_WORDS])
        cues = self._cue_counts(head) + self._cue_counts(prompt) + self._cue_counts(context)
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
        return np.log1p(np.asarray(cues, dtype=np.float32)).tolist() + shape


class _Linear:
    """A fitted multinomial (or binary) logistic regression, evaluated in numpy."""

    def __init__(self, model: LogisticRegression) -> None:
        self.classes = [str(c) for c in model.classes_]
        self.weights = model.coef_.astype(np.float64)
        self.bias = model.intercept_.astype(np.float64)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        scores = self.weights @ x + self.bias
        if len(self.classes) == 2:  # scikit-learn keeps one row for the second class
            p = 1.0 / (1.0 + math.exp(-float(scores[0])))
            return np.array([1.0 - p, p])
        scores = np.exp(scores - scores.max())
        return scores / scores.sum()


class TaskClassifier:
    """Learns from an example set and its embeddings (one row per example, in order)."""

    def __init__(self, example_set: ExampleSet, embeddings: np.ndarray, complex_threshold: float) -> None:
        if len(embeddings) != len(example_set.examples):
            raise ValueError("one embedding per example is needed")
        self.task_types = example_set.task_types
        self.complex_threshold = complex_threshold
        self._features = TextFeatures(example_set)
        shapes = np.array([self._features(e.text, e.context) for e in example_set.examples])
        self._mean = shapes.mean(axis=0)
        self._scale = shapes.std(axis=0) + 1e-6
        vectors = np.asarray(embeddings, dtype=np.float64)
        labels = [e.task_type for e in example_set.examples]
        self._task = _Linear(
            LogisticRegression(C=REGULARISATION_C, max_iter=5000).fit(self._input(vectors, shapes), labels)
        )
        difficulties = [e.difficulty.value for e in example_set.examples]
        self._difficulty = _Linear(
            LogisticRegression(C=DIFFICULTY_REGULARISATION_C, max_iter=5000).fit(
                self._input(vectors, shapes, DIFFICULTY_FEATURE_WEIGHT), difficulties
            )
        )
        self._complex_index = self._difficulty.classes.index(Difficulty.COMPLEX.value)
        # The nearest examples vote too: a task type added with a handful of examples is found by its
        # neighbours before a linear model has enough of them to learn it.
        self._examples = vectors
        self._example_tasks = np.array([self._task.classes.index(t) for t in labels])
        self._example_complex = np.array(
            [d == Difficulty.COMPLEX.value for d in difficulties], dtype=np.float64
        )

    def _input(self, vectors: np.ndarray, shapes: np.ndarray, weight: float = FEATURE_WEIGHT) -> np.ndarray:
        return np.hstack([vectors, (shapes - self._mean) / self._scale * weight])

    def classify(
        self, embedding: Sequence[float] | np.ndarray, prompt: str, context: str = ""
    ) -> Classification:
        shape = np.asarray(self._features(prompt, context), dtype=np.float64)[None, :]
        vector = np.asarray(embedding, dtype=np.float64)[None, :]
        task = self._task.probabilities(self._input(vector, shape)[0])
        hard = self._difficulty.probabilities(self._input(vector, shape, DIFFICULTY_FEATURE_WEIGHT)[0])
        neighbour_tasks, neighbour_complex = self._neighbours(vector[0])
        task = (1 - NEIGHBOUR_WEIGHT) * task + NEIGHBOUR_WEIGHT * neighbour_tasks
        best = int(task.argmax())
        complex_probability = float(
            (1 - NEIGHBOUR_WEIGHT) * hard[self._complex_index] + NEIGHBOUR_WEIGHT * neighbour_complex
        )
        difficulty = (
            Difficulty.COMPLEX if complex_probability >= self.complex_threshold else Difficulty.SIMPLE
        )
        return Classification(self._task.classes[best], difficulty, float(task[best]), complex_probability)

    def _neighbours(self, vector: np.ndarray) -> tuple[np.ndarray, float]:
        """The task-type shares and the complex share among the nearest examples, weighted by similarity."""
        similarities = self._examples @ vector
        nearest = np.argpartition(-similarities, min(NEIGHBOURS, len(similarities) - 1))[:NEIGHBOURS]
        weights = np.exp(NEIGHBOUR_SHARPNESS * similarities[nearest])
        weights /= weights.sum()
        tasks = np.bincount(self._example_tasks[nearest], weights=weights, minlength=len(self._task.classes))
        return tasks, float(weights @ self._example_complex[nearest])
