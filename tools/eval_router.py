"""python -m tools.eval_router ITEMS.jsonl --out PRED.jsonl — the Router's real classifier, with the
reference config (config/sophia.yaml → routing.classifier), over labelled prompts in the format of
shared/eval/router_dev.jsonl. Needs no running mesh.

Writes {"id", "task_type", "difficulty"} per item and prints accuracy per task type, the confusions,
difficulty accuracy and under-routing (complex prompts it would send to a cheap model).

Items that are also among the classifier's examples (the reference config ships the dev file as
examples) are never scored by a classifier that learned from them: they are predicted by k-fold
cross-validation, each fold by a classifier trained on every example except that fold's.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from libs.config import REPO_ROOT, load_config
from libs.sentence_embeddings import EMBEDDING_MODEL_ID, load_embedding_model, normalise_text
from services.router.classifier import (
    ExampleSet,
    TaskClassifier,
    conversation_parts,
    load_examples,
)
from services.router.embedder import PromptEmbedder, seed_path, write_seed

FOLDS = 5
# The first fold split; --repeats takes the next seeds too.
FOLD_SEED = 7


def _path(value: str) -> pathlib.Path:
    path = pathlib.Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def _subset(example_set: ExampleSet, keep: np.ndarray) -> ExampleSet:
    examples = tuple(e for e, k in zip(example_set.examples, keep, strict=False) if k)
    return dataclasses.replace(example_set, examples=examples)


def predict(
    items: list[dict],
    embedder: PromptEmbedder,
    example_set: ExampleSet,
    settings,
    seeds: Sequence[int],
    item_embedder: PromptEmbedder | None = None,
) -> tuple[list[list], int]:
    """Predictions per item for each fold split (one per seed), and how many items were predicted by
    cross-validation (the same in every split; without any, one split). The items are embedded by
    `item_embedder` when given (the examples always by `embedder`, as the Router embeds them)."""
    example_vectors = embedder.embed_cached(
        [e.text for e in example_set.examples],
        _path(settings.embedding_cache_dir),
        seed_path(_path(settings.examples_file)),
    )
    parts = [
        conversation_parts(item["messages"]) if item.get("messages") else (item["prompt"], "")
        for item in items
    ]
    prompts = [prompt for prompt, _ in parts]
    vectors = (
        item_embedder.embed_prompts(prompts)
        if item_embedder is not None
        else embedder.embed_cached(prompts, _path(settings.embedding_cache_dir))
    )
    example_keys = [normalise_text(e.text) for e in example_set.examples]
    key_rows = collections.defaultdict(list)
    for row, key in enumerate(example_keys):
        key_rows[key].append(row)
    seen = [i for i, (prompt, _) in enumerate(parts) if normalise_text(prompt) in key_rows]
    full = TaskClassifier(example_set, example_vectors, settings.complex_threshold)
    splits = []
    for seed in seeds if seen else seeds[:1]:
        order = np.random.default_rng(seed).permutation(seen).tolist()
        folds = {i: n % FOLDS for n, i in enumerate(order)}
        classifiers = {}
        for fold in range(FOLDS if seen else 0):
            keep = np.ones(len(example_keys), dtype=bool)
            for i, f in folds.items():
                if f == fold:
                    keep[key_rows[normalise_text(parts[i][0])]] = False
            classifiers[fold] = TaskClassifier(
                _subset(example_set, keep), example_vectors[keep], settings.complex_threshold
            )
        splits.append(
            [
                (classifiers[folds[i]] if i in folds else full).classify(vectors[i], prompt, context)
                for i, (prompt, context) in enumerate(parts)
            ]
        )
    return splits, len(seen)


@dataclasses.dataclass(frozen=True)
class Scores:
    items: int
    task_type_right: int
    difficulty_right: int
    complex_items: int
    # Complex items predicted simple (the quality risk), simple items predicted complex (money lost).
    under_routed: int
    over_routed: int

    def rates(self) -> dict[str, float]:
        simple_items = self.items - self.complex_items
        return {
            "task type": self.task_type_right / self.items,
            "difficulty": self.difficulty_right / self.items,
            "under-routing": self.under_routed / max(self.complex_items, 1),
            "over-routing": self.over_routed / max(simple_items, 1),
        }


def scores(items: list[dict], predictions: list) -> Scores:
    pairs = [(item, p.task_type, p.difficulty.value) for item, p in zip(items, predictions, strict=True)]
    return Scores(
        items=len(items),
        task_type_right=sum(item["task_type"] == task for item, task, _ in pairs),
        difficulty_right=sum(item["difficulty"] == difficulty for item, _, difficulty in pairs),
        complex_items=sum(item["difficulty"] == "complex" for item in items),
        under_routed=sum(item["difficulty"] == "complex" != d for item, _, d in pairs),
        over_routed=sum(item["difficulty"] == "simple" != d for item, _, d in pairs),
    )


def report_splits(items: list[dict], splits: list[list]) -> None:
    """Mean and spread of the scores over several fold splits."""
    rates = [scores(items, predictions).rates() for predictions in splits]
    print(f"over {len(splits)} fold splits (mean ± standard deviation, min-max):")
    for name in rates[0]:
        values = np.array([r[name] for r in rates])
        spread = f"{values.mean():.3f} ± {values.std():.3f}  ({values.min():.3f}-{values.max():.3f})"
        print(f"  {name:<14} {spread}")


def report(items: list[dict], predictions: list) -> None:
    truth = [item.get("task_type") for item in items]
    if not all(truth):
        print("items carry no labels: predictions written, nothing scored")
        return
    predicted = [p.task_type for p in predictions]
    labels = sorted(set(truth) | set(predicted))
    correct = sum(t == p for t, p in zip(truth, predicted, strict=False))
    print(f"task type accuracy: {correct / len(items):.3f} ({correct}/{len(items)})")
    print(f"{'task type':<20} {'recall':>7} {'precision':>9} {'n':>4}")
    for label in labels:
        n = sum(t == label for t in truth)
        hits = sum(t == p == label for t, p in zip(truth, predicted, strict=False))
        claimed = sum(p == label for p in predicted)
        print(f"{label:<20} {hits / n if n else 0:>7.3f} {hits / claimed if claimed else 0:>9.3f} {n:>4}")
    confusions = collections.Counter((t, p) for t, p in zip(truth, predicted, strict=False) if t != p)
    print("most common confusions (true → predicted):")
    for (t, p), count in confusions.most_common(10):
        print(f"  {t} → {p}: {count}")
    overall = scores(items, predictions)
    rates = overall.rates()
    simple_items = overall.items - overall.complex_items
    print(f"difficulty accuracy: {rates['difficulty']:.3f} ({overall.difficulty_right}/{overall.items})")
    print(
        f"under-routing (complex → cheap model): {rates['under-routing']:.3f} "
        f"({overall.under_routed}/{overall.complex_items})"
    )
    print(
        f"over-routing (simple → strong model): {rates['over-routing']:.3f} "
        f"({overall.over_routed}/{simple_items})"
    )


def _lookup_embedder(config) -> PromptEmbedder:
    semantic = config.cache.semantic
    model = load_embedding_model(
        EMBEDDING_MODEL_ID, _path(config.inference.weights_dir), "cpu", int8=semantic.int8,
        runtime=semantic.embedding_runtime, threads=semantic.embedding_threads,
    )  # fmt: skip
    return PromptEmbedder(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", help="labelled prompts, JSON Lines (router_dev.jsonl format)")
    parser.add_argument("--out", required=True, help="where to write one prediction per line")
    parser.add_argument(
        "--write-seed",
        action="store_true",
        help="also (re)write the examples' shipped embeddings (routing.classifier.examples_file → .npz)",
    )
    parser.add_argument(
        "--examples-only",
        action="store_true",
        help="learn from routing.classifier.examples_file alone, not the extra (dev) examples files: "
        "labelled items are then scored by a classifier that never saw them",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help=f"cross-validate with this many different {FOLDS}-fold splits and print the mean and spread "
        "(the report and the predictions written are the first split's)",
    )
    parser.add_argument(
        "--lookup-vectors",
        action="store_true",
        help="score each item's vector as the SemanticCache's Lookup returns it (cache.semantic: runtime, "
        "int8), which the Gateway hands to the Router; the examples stay the Router's float32 vectors",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    items = [json.loads(line) for line in pathlib.Path(args.items).read_text().splitlines() if line.strip()]
    config = load_config()
    settings = config.routing.classifier
    extra = [] if args.examples_only else [_path(f) for f in settings.extra_examples_files]
    example_set = load_examples(_path(settings.examples_file), extra)
    embedder = PromptEmbedder(load_embedding_model(EMBEDDING_MODEL_ID, device="cpu"))
    seeds = [FOLD_SEED + n for n in range(args.repeats)]
    item_embedder = _lookup_embedder(config) if args.lookup_vectors else None
    splits, cross_validated = predict(items, embedder, example_set, settings, seeds, item_embedder)
    if args.write_seed:
        texts = [e.text for e in example_set.examples]
        seed = seed_path(_path(settings.examples_file))
        write_seed(seed, texts, embedder.embed_cached(texts, _path(settings.embedding_cache_dir)))
        print(f"wrote {seed}")
    predictions = splits[0]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as out:
        for item, p in zip(items, predictions, strict=False):
            out.write(
                json.dumps({"id": item["id"], "task_type": p.task_type, "difficulty": p.difficulty.value})
                + "\n"
            )
    print(
        f"{len(items)} items; {len(example_set.examples)} examples, {len(example_set.task_types)} task types"
    )
    if cross_validated:
        print(f"{cross_validated} items are among the examples: predicted by {FOLDS}-fold cross-validation")
    report(items, predictions)
    if len(splits) > 1 and all(item.get("task_type") for item in items):
        report_splits(items, splits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
