"""The Router's classifier with the real MiniLM model and the reference examples: an operator adds a task
type with a handful of example prompts in the examples file and prompts of that kind are found; bad
examples files are refused naming the problem; cue features match the plain regex search exactly."""

from __future__ import annotations

import dataclasses
import functools
import re
import textwrap

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from libs.config import REPO_ROOT
from libs.sentence_embeddings import EMBEDDING_MODEL_ID, load_embedding_model
from services.router.classifier import (
    WORDS_REGULARISATION_C,
    Difficulty,
    ExamplesError,
    TaskClassifier,
    WordModel,
    conversation_parts,
    load_examples,
    word_grams,
)
from services.router.embedder import PromptEmbedder, seed_path
from services.router.prompt_features import TextFeatures

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


def test_difficulty_cue_groups_mark_a_short_prompt_with_hard_limits_complex():
    """Length is not difficulty: a one-line ask with an exact word count and alliteration needs a strong
    model; the examples file's difficulty groups (hard limits, style constraints) are what see it."""
    tasks = classifier(EXAMPLES)
    example_set = load_examples(EXAMPLES)
    vectors = embedder().embed_cached(
        [e.text for e in example_set.examples], REPO_ROOT / "var" / "cache" / "router", seed_path(EXAMPLES)
    )
    without_groups = TaskClassifier(dataclasses.replace(example_set, difficulty_cues={}), vectors, 0.45)
    limited = "Give me a tagline for the gym, exactly 5 words, with alliteration."
    hard = classify(tasks, limited)
    assert hard.difficulty is Difficulty.COMPLEX
    assert hard.complex_probability > classify(without_groups, limited).complex_probability
    quick = classify(tasks, "Quick question: what's a good name for our team channel?")
    assert quick.difficulty is Difficulty.SIMPLE


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


TWO_TASK_TYPES = """
task_types:
  x: {examples: [{difficulty: simple, text: hi}]}
  y: {examples: [{difficulty: complex, text: ho}]}
"""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("task_types: {}\n", "task_types: must map"),
        ("task_types:\n  x: {examples: []}\n", "task_types.x.examples: at least one example"),
        ("task_types:\n  x: {examples: [{difficulty: easy, text: hi}]}\n", "difficulty must be"),
        ("task_types:\n  x: {examples: [{difficulty: simple}]}\n", "examples[0].text"),
        ("task_types:\n  x: {cues: ['(unclosed'], examples: [{difficulty: simple, text: hi}]}\n", "cues[0]"),
        ("task_types: [\n", "invalid YAML"),
        ("task_types:\n  x: {examples: [{difficulty: simple, text: hi}]}\n", "at least two task types"),
        (TWO_TASK_TYPES + "difficulty_cues: [a]\n", "difficulty_cues: must map each group"),
        (TWO_TASK_TYPES + "difficulty_cues: {limits: 'x'}\n", "difficulty_cues.limits: must be a list"),
        (TWO_TASK_TYPES + "difficulty_cues: {limits: ['(x']}\n", "difficulty_cues.limits[0]"),
    ],
)
def test_a_bad_examples_file_is_refused_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "examples.yaml"
    path.write_text(text)
    with pytest.raises(ExamplesError, match=re.escape(problem)):
        load_examples(path)


def test_examples_without_a_single_word_are_refused():
    example_set = load_examples(EXAMPLES)
    wordless = [dataclasses.replace(e, text="?!") for e in example_set.examples]
    with pytest.raises(ExamplesError, match="no example prompt contains a word"):
        TaskClassifier(
            dataclasses.replace(example_set, examples=tuple(wordless)),
            np.eye(len(wordless), 384),
            complex_threshold=0.45,
        )


def test_a_labelled_line_that_is_not_an_object_is_refused_naming_the_line(tmp_path):
    path, extra = tmp_path / "examples.yaml", tmp_path / "extra.jsonl"
    path.write_text(TWO_TASK_TYPES)
    extra.write_text('{"prompt": "hi", "task_type": "x", "difficulty": "simple"}\n["hi", "x"]\n')
    with pytest.raises(ExamplesError, match=re.escape(f"{extra}:2: must be a JSON object")):
        load_examples(path, [extra])


def test_cue_counts_match_a_plain_search_of_every_cue(tmp_path):
    example_set = load_examples(EXAMPLES)
    task_cues = [example_set.cues[t] for t in example_set.task_types]
    features = TextFeatures(task_cues, list(example_set.difficulty_cues.values()))
    texts = [e.text for e in example_set.examples] + [
        textwrap.dedent("""\
            SELECT unit, count(*) FROM leases GROUP BY 1; -- why is this slow?
            | month | rent |
            |---|---|
            Wie hoch ist die Leerstandsquote? 翻译成中文 $40 at 15% ¿Qué significa?"""),
        # Literals inside other words before the real matches; a character that lowercases to two.
        "Differently said: thanksgiving plans, Q5 then Q3? If so, thanks. Kickoff then quick call.",
        "İstanbul office: what is the Q2 churn risk, and should we translate it into Turkish?",
    ]

    def plain(groups, text, prefix_chars):
        matches = [[cue.search(text) for cue in group] for group in groups]
        return (
            [sum(1 for m in group if m) for group in matches],
            [sum(1 for m in group if m and m.start() < prefix_chars) for group in matches],
        )

    for text in texts:
        for prefix_chars in (0, 60, len(text)):
            assert features.task_cues(text, prefix_chars) == plain(task_cues, text, prefix_chars), text
            difficulty_cues = example_set.difficulty_cues.values()
            expected = plain(difficulty_cues, text, prefix_chars)
            assert features.difficulty_cues(text, prefix_chars) == expected, text


@pytest.mark.parametrize("task_types", [None, ("code", "translation")])
def test_the_word_model_gives_scikit_learns_probabilities(task_types):
    """The hand-evaluated TF-IDF model agrees with scikit-learn's own transform and predict_proba, with
    many task types and with two (where scikit-learn keeps one row of weights)."""
    example_set = load_examples(EXAMPLES)
    examples = [e for e in example_set.examples if task_types is None or e.task_type in task_types]
    texts = [e.text for e in examples]
    labels = [e.task_type for e in examples]
    classes = sorted(set(labels), reverse=True)  # not scikit-learn's order: the model must reorder
    words = WordModel(texts, labels, classes)
    vectorizer = TfidfVectorizer(analyzer=word_grams, sublinear_tf=True)
    reference = LogisticRegression(C=WORDS_REGULARISATION_C, max_iter=5000)
    reference.fit(vectorizer.fit_transform(texts), labels)
    order = [list(reference.classes_).index(c) for c in classes]
    prompts = [
        *texts[::7],
        "Summarise this call, twice: summarise it! zzz-unknown-word",
        "!!!",
        "x " * 3000 + "translate this into French",
    ]
    for prompt in prompts:
        expected = reference.predict_proba(vectorizer.transform([prompt]))[0][order]
        np.testing.assert_allclose(words.probabilities(prompt), expected, atol=1e-9, err_msg=prompt[:60])
