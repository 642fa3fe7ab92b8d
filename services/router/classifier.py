"""Task type and difficulty of a prompt, from its MiniLM embedding, its words and cheap text features.

Learnt from labelled example prompts at start-up and on reload (scikit-learn fits; prediction is a few
small matrix-vector products in numpy, so it costs well under a millisecond; the embedding is what
costs). The task type blends three views of the prompt:

- a logistic regression over the embedding next to the task block of `TextFeatures` (each task type's
  cue expressions in the prompt's first words, the whole prompt and the context; length, code, tables);
- a logistic regression over the prompt's words and word pairs (TF-IDF): instruction words such as
  "summarise", "rewrite" or "translate" decide many prompts whose topic the embedding sees first;
- the nearest examples' vote, so a task type added with a handful of examples is found at once.

The difficulty (`complex`: needs a strong model) is a logistic regression over the embedding, the task
block and the difficulty block (cue groups from the examples file: hard limits, judgement, multi-step
reasoning, risky code...; how many sentences and clauses the instruction has), blended with the
nearest examples' share of complex ones.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import yaml
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from services.router.prompt_features import MAX_FEATURE_CHARS, TextFeatures

# Weights of the feature blocks next to the unit-length embedding (features are standardised first),
# and the models' regularisation, chosen by repeated 5-fold cross-validation on the dev set
# (docs/routing.md, Evaluation).
TASK_FEATURE_WEIGHT = 0.25
DIFFICULTY_TASK_FEATURE_WEIGHT = 0.1
DIFFICULTY_FEATURE_WEIGHT = 0.15
REGULARISATION_C = 4.0
WORDS_REGULARISATION_C = 30.0
DIFFICULTY_REGULARISATION_C = 16.0
# How the task type's three views are blended (they sum to 1).
EMBEDDING_WEIGHT = 0.35
WORDS_WEIGHT = 0.4
NEIGHBOUR_WEIGHT = 0.25
# The nearest examples' vote (cosine similarity, softmax-weighted); it also takes this share of the
# difficulty.
NEIGHBOURS = 15
NEIGHBOUR_SHARPNESS = 10.0
DIFFICULTY_NEIGHBOUR_WEIGHT = 0.25
_WORD = re.compile(r"\w+")


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
    # Named groups of expressions whose counts hint that a prompt is complex (or simple).
    difficulty_cues: dict[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Classification:
    task_type: str
    difficulty: Difficulty
    # The task type's probability.
    confidence: float
    # The difficulty model's probability that the prompt is complex.
    complex_probability: float


def _compile_cues(patterns: object, where: str) -> tuple[re.Pattern[str], ...]:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ExamplesError(f"{where}: must be a list of regular expressions")
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern, re.I | re.M))
        except re.error as exc:
            raise ExamplesError(f"{where}[{index}]: {exc}") from None
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
        cues[task_type] = _compile_cues(entry.get("cues", []), f"{where}.cues")
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
    if len(task_types) < 2:
        raise ExamplesError(f"{path}: task_types: at least two task types are needed to tell them apart")
    difficulty_cues = _difficulty_cues(raw.get("difficulty_cues", {}), f"{path}: difficulty_cues")
    for extra in extra_files:
        examples.extend(_jsonl_examples(extra, set(task_types)))
    if len({e.difficulty for e in examples}) < 2:
        raise ExamplesError(f"{path}: examples of both difficulties are needed")
    return ExampleSet(task_types, cues, tuple(examples), difficulty_cues)


def _difficulty_cues(raw: object, where: str) -> dict[str, tuple[re.Pattern[str], ...]]:
    if not isinstance(raw, dict):
        raise ExamplesError(f"{where}: must map each group's name to its regular expressions")
    return {str(name): _compile_cues(patterns, f"{where}.{name}") for name, patterns in raw.items()}


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
        if not isinstance(item, dict):
            raise ExamplesError(f"{where}: must be a JSON object")
        if item.get("task_type") not in task_types:
            raise ExamplesError(f"{where}: task_type {item.get('task_type')!r} is not in the examples file")
        prompt, context = conversation_parts(item.get("messages") or [{"role": "user", "content": ""}])
        prompt = item.get("prompt") or prompt
        examples.append(
            Example(prompt, item["task_type"], _difficulty(item.get("difficulty"), where), context)
        )
    return examples


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


class WordModel:
    """Task type from the prompt's words and word pairs: TF-IDF (sublinear counts) and a logistic
    regression, fitted with scikit-learn and evaluated here: scikit-learn's transform and predict cost
    about 1.1 ms per prompt, this about 0.1 ms, and it gives the same probabilities."""

    def __init__(self, texts: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> None:
        if not any(_WORD.search(text) for text in texts):
            raise ExamplesError("examples: no example prompt contains a word")
        vectorizer = TfidfVectorizer(analyzer=word_grams, sublinear_tf=True)
        model = LogisticRegression(C=WORDS_REGULARISATION_C, max_iter=5000)
        model.fit(vectorizer.fit_transform(texts), labels)
        weights, bias = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # one row, for the second class: a softmax over (0, row) is the same
            weights, bias = np.vstack([np.zeros_like(weights), weights]), np.array([0.0, bias[0]])
        order = [list(model.classes_).index(c) for c in classes]
        self._columns = {gram: int(column) for gram, column in vectorizer.vocabulary_.items()}
        self._idf = vectorizer.idf_.astype(np.float64)
        # One row per vocabulary entry, one column per class (in the classifier's class order).
        self._weights = np.ascontiguousarray(weights[order].T, dtype=np.float64)
        self._bias = bias[order].astype(np.float64)

    def probabilities(self, text: str) -> np.ndarray:
        vocabulary = self._columns
        known = [(c, n) for g, n in Counter(word_grams(text)).items() if (c := vocabulary.get(g)) is not None]
        scores = self._bias.copy()
        if known:
            columns = np.fromiter((c for c, _ in known), dtype=np.intp, count=len(known))
            tf = 1.0 + np.log(np.fromiter((n for _, n in known), dtype=np.float64, count=len(known)))
            values = tf * self._idf[columns]
            scores += (values / np.linalg.norm(values)) @ self._weights[columns]
        scores = np.exp(scores - scores.max())
        return scores / scores.sum()


def word_grams(text: str) -> list[str]:
    """The lowercase words of a text (its first MAX_FEATURE_CHARS) and each pair of adjacent words."""
    words = _WORD.findall(text[:MAX_FEATURE_CHARS].lower())
    return words + list(map(" ".join, itertools.pairwise(words)))


class TaskClassifier:
    """Learns from an example set and its embeddings (one row per example, in order)."""

    def __init__(self, example_set: ExampleSet, embeddings: np.ndarray, complex_threshold: float) -> None:
        if len(embeddings) != len(example_set.examples):
            raise ValueError("one embedding per example is needed")
        self.task_types = example_set.task_types
        self.complex_threshold = complex_threshold
        self._features = TextFeatures(
            [example_set.cues[t] for t in example_set.task_types], list(example_set.difficulty_cues.values())
        )
        examples = example_set.examples
        features = np.array([self._features(e.text, e.context) for e in examples], dtype=np.float64)
        self._mean = features.mean(axis=0)
        self._scale = features.std(axis=0) + 1e-6
        task_block = np.arange(features.shape[1]) < self._features.task_size
        # Each model's weight per feature column (columns are standardised first).
        self._task_weights = np.where(task_block, TASK_FEATURE_WEIGHT, 0.0)
        self._difficulty_weights = np.where(
            task_block, DIFFICULTY_TASK_FEATURE_WEIGHT, DIFFICULTY_FEATURE_WEIGHT
        )
        vectors = np.asarray(embeddings, dtype=np.float64)
        labels = [e.task_type for e in examples]
        difficulties = [e.difficulty.value for e in examples]
        # One thread: on a busy machine BLAS threads make these small fits several times slower.
        with threadpool_limits(limits=1):
            self._task = _Linear(
                LogisticRegression(C=REGULARISATION_C, max_iter=5000).fit(
                    self._input(vectors, features, self._task_weights), labels
                )
            )
            self._words = WordModel([e.text for e in examples], labels, self._task.classes)
            self._difficulty = _Linear(
                LogisticRegression(C=DIFFICULTY_REGULARISATION_C, max_iter=5000).fit(
                    self._input(vectors, features, self._difficulty_weights), difficulties
                )
            )
        self._complex_index = self._difficulty.classes.index(Difficulty.COMPLEX.value)
        self._examples = vectors
        self._example_tasks = np.array([self._task.classes.index(t) for t in labels])
        self._example_complex = np.array(
            [d == Difficulty.COMPLEX.value for d in difficulties], dtype=np.float64
        )

    def _input(self, vectors: np.ndarray, features: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.hstack([vectors, (features - self._mean) / self._scale * weights])

    def classify(
        self, embedding: Sequence[float] | np.ndarray, prompt: str, context: str = ""
    ) -> Classification:
        features = np.asarray(self._features(prompt, context), dtype=np.float64)[None, :]
        vector = np.asarray(embedding, dtype=np.float64)[None, :]
        neighbour_tasks, neighbour_complex = self._neighbours(vector[0])
        task = (
            EMBEDDING_WEIGHT * self._task.probabilities(self._input(vector, features, self._task_weights)[0])
            + WORDS_WEIGHT * self._words.probabilities(prompt)
            + NEIGHBOUR_WEIGHT * neighbour_tasks
        )
        best = int(task.argmax())
        hard = self._difficulty.probabilities(self._input(vector, features, self._difficulty_weights)[0])
        complex_probability = float(
            (1 - DIFFICULTY_NEIGHBOUR_WEIGHT) * hard[self._complex_index]
            + DIFFICULTY_NEIGHBOUR_WEIGHT * neighbour_complex
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
