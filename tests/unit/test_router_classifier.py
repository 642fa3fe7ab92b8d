"""The Router's classifier with the real MiniLM model and the reference examples: an operator adds a task
type with a handful of example prompts in the examples file and prompts of that kind are found; bad
examples files are refused naming the problem; cue features match the plain regex search exactly."""

from __future__ import annotations

import functools
import re
import textwrap

import pytest

from libs.config import REPO_ROOT
from libs.sentence_embeddings import EMBEDDING_MODEL_ID, load_embedding_model
from services.router.classifier import (
    Difficulty,
    ExamplesError,
    TaskClassifier,
    TextFeatures,
    conversation_parts,
    load_examples,
)
from services.router.embedder import PromptEmbedder, seed_path

EXAMPLES = REPO_ROOT / "config" / "router_examples.yaml"
NEW_TASK_TYPE = """
  legal_review:
    cues: ['\\bclause\\b', '\\bindemnif', '\\bliabilit']
    examples:
      - {difficulty: simple, text: "Is this NDA clause one-sided? 'The Recipient keeps it all secret.'"}
      - {difficulty: complex, text: "Review this liability cap clause: what risks does it leave us?"}
      - {difficulty: simple, text: "Does a non-compete clause like this hold up for a junior employee?"}
      - {difficulty: complex, text: "Mark up this indemnification section: mutual, capped at fees paid."}
      - {difficulty: complex, text: "Which of these contract terms should counsel push back on?"}
"""


@functools.cache
def embedder() -> PromptEmbedder:
    return PromptEmbedder(load_embedding_model(EMBEDDING_MODEL_ID, device="cpu"))


def classifier(examples_file, extra=()) -> TaskClassifier:
    example_set = load_examples(examples_file, extra)
    vectors = embedder().embed_cached(
        [e.text for e in example_set.examples], REPO_ROOT / "var" / "cache" / "router", seed_path(EXAMPLES)
    )
    return TaskClassifier(example_set, vectors, complex_threshold=0.45)


def classify(tasks: TaskClassifier, prompt: str, context: str = ""):
    return tasks.classify(embedder().embed_prompts([prompt])[0], prompt, context)


def test_a_task_type_added_with_a_few_examples_is_found(tmp_path):
    extended = tmp_path / "examples.yaml"
    extended.write_text(EXAMPLES.read_text().rstrip() + "\n" + NEW_TASK_TYPE)
    tasks = classifier(extended)
    assert "legal_review" in tasks.task_types
    for prompt in (
        "Can you check whether the termination clause in this vendor agreement favours them?",
        "Is the liability cap in this SaaS contract reasonable for a company our size?",
    ):
        assert classify(tasks, prompt).task_type == "legal_review", prompt
    # The others keep their labels.
    assert classify(tasks, "Translate to French: 'The gym closes at ten.'").task_type == "translation"


def test_reference_examples_classify_plain_prompts_and_difficulty():
    tasks = classifier(EXAMPLES, [REPO_ROOT / "config" / "router_examples_dev.jsonl"])
    simple = classify(tasks, "what does ARR stand for?")
    assert (simple.task_type, simple.difficulty) == ("general", Difficulty.SIMPLE)
    hard = classify(
        tasks,
        "Implement a lock-free multi-producer queue in C++ with correct memory ordering and explain "
        "why it is linearizable.",
    )
    assert (hard.task_type, hard.difficulty) == ("code", Difficulty.COMPLEX)
    assert 0 < simple.confidence <= 1


def test_the_conversation_before_the_prompt_counts():
    prompt, context = conversation_parts(
        [
            {"role": "system", "content": "You are a translator. Output only the translation."},
            {"role": "user", "content": "Bonjour"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "and 'à demain'?"},
        ]
    )
    assert prompt == "and 'à demain'?"
    assert "translator" in context and "Hello" in context


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("task_types: {}\n", "task_types: must map"),
        ("task_types:\n  x: {examples: []}\n", "task_types.x.examples: at least one example"),
        ("task_types:\n  x: {examples: [{difficulty: easy, text: hi}]}\n", "difficulty must be"),
        ("task_types:\n  x: {examples: [{difficulty: simple}]}\n", "examples[0].text"),
        ("task_types:\n  x: {cues: ['(unclosed'], examples: [{difficulty: simple, text: hi}]}\n", "cues[0]"),
        ("task_types: [\n", "invalid YAML"),
    ],
)
def test_a_bad_examples_file_is_refused_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "examples.yaml"
    path.write_text(text)
    with pytest.raises(ExamplesError, match=re.escape(problem)):
        load_examples(path)


def test_cue_counts_match_a_plain_search_of_every_cue(tmp_path):
    example_set = load_examples(EXAMPLES)
    features = TextFeatures(example_set)
    texts = [e.text for e in example_set.examples] + [
        textwrap.dedent("""\
            SELECT unit, count(*) FROM leases GROUP BY 1; -- why is this slow?
            | month | rent |
            |---|---|
            Wie hoch ist die Leerstandsquote? 翻译成中文 $40 at 15% ¿Qué significa?"""),
    ]
    for text in texts:
        plain = [sum(1 for cue in example_set.cues[t] if cue.search(text)) for t in example_set.task_types]
        assert features._cue_counts(text) == plain, text
