"""Evaluates the semantic cache's decisions on labelled question pairs.

    python -m tools.eval_semantic_cache PAIRS.jsonl --out PRED.jsonl [--cv 5]

For each pair of PAIRS.jsonl (format of shared/eval/semantic_cache_dev.jsonl), in a fresh scope, `a` is
stored with a dummy answer and `b` is looked up, through the service's own `Cache` (the same classes,
model, guards and reference config as `python -m services.cache`) against a throwaway Redis started on
a free port. One line per pair goes to --out: {"id", "hit", "similarity", "layer", "veto"}. Printed:
precision, recall and F0.5 over all pairs, and per kind the hit rate and the vetoes.

--cv K: the similarity threshold is the one setting chosen on labelled data, so this re-decides the pairs
at every threshold of a grid (decisions are exact: a pair is a hit when it is an exact hit, or when its
similarity reaches the threshold and no guard vetoed it) and reports K-fold cross-validation: the
threshold picked on K-1 folds (best F0.5 with precision ≥ 0.97) scored on the held-out fold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from redis.asyncio import Redis

from libs.config import load_config
from services.cache.domain import Layer, LookupQuery, StoreCommand
from services.cache.embedder import build_cache
from tools.ports import free_port

TENANT = "eval"
MODEL = "eval-model"
DUMMY_ANSWER = b'{"answer": "dummy"}'
PRECISION_FLOOR = 0.97
THRESHOLD_GRID = [round(0.40 + 0.01 * step, 2) for step in range(56)]  # 0.40 … 0.95


@dataclass
class Outcome:
    pair: dict
    hit: bool
    similarity: float
    layer: str
    veto: str


def start_redis(directory: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", directory, "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, port


async def run_pairs(pairs: list[dict], port: int, threshold: float | None) -> list[Outcome]:
    config = load_config()
    cache_config = config.cache
    if threshold is not None:
        semantic = cache_config.semantic.model_copy(update={"similarity_threshold": threshold})
        cache_config = cache_config.model_copy(update={"semantic": semantic})
    redis = Redis(host="127.0.0.1", port=port, decode_responses=False)
    for _ in range(100):
        try:
            await redis.ping()
            break
        except OSError:
            await asyncio.sleep(0.05)
    cache = await asyncio.to_thread(build_cache, redis, cache_config, config.inference.weights_dir)
    await cache.start()
    outcomes = []
    try:
        for pair in pairs:
            scope = f"eval-pair:{pair['id']}"  # a fresh scope per pair: only `a` is a candidate for `b`
            await cache.store(StoreCommand(TENANT, MODEL, scope, pair["a"], DUMMY_ANSWER, semantic=True))
            result = await cache.lookup(LookupQuery(TENANT, MODEL, scope, pair["b"], semantic=True))
            outcomes.append(
                Outcome(
                    pair,
                    hit=result.layer is not None,
                    similarity=round(float(result.similarity), 4),
                    layer=result.layer.value if result.layer else "",
                    veto=result.veto.value if result.veto else "",
                )
            )
    finally:
        await cache.close()
    return outcomes


def scores(labels: list[bool], hits: list[bool]) -> tuple[float, float, float]:
    true_hits = sum(1 for same, hit in zip(labels, hits, strict=True) if same and hit)
    predicted, positives = sum(hits), sum(labels)
    precision = true_hits / predicted if predicted else 1.0
    recall = true_hits / positives if positives else 0.0
    f05 = 1.25 * precision * recall / (0.25 * precision + recall) if precision + recall else 0.0
    return precision, recall, f05


def report(outcomes: list[Outcome], threshold: float) -> None:
    labels = [o.pair["same"] for o in outcomes]
    precision, recall, f05 = scores(labels, [o.hit for o in outcomes])
    print(f"pairs {len(outcomes)}  threshold {threshold:.2f}")
    print(f"precision {precision:.3f}  recall {recall:.3f}  F0.5 {f05:.3f}  "
          f"(hits {sum(o.hit for o in outcomes)}, false hits "
          f"{sum(o.hit and not o.pair['same'] for o in outcomes)})")  # fmt: skip
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.pair.get("kind", "?")].append(outcome)
    print(f"{'kind':<12} {'same':>5} {'pairs':>5} {'hit rate':>8}  {'exact':>5}  vetoes")
    for kind, group in sorted(by_kind.items(), key=lambda item: (not item[1][0].pair["same"], item[0])):
        vetoes = Counter(o.veto for o in group if o.veto)
        print(
            f"{kind:<12} {group[0].pair['same']!s:>5} {len(group):>5} "
            f"{sum(o.hit for o in group) / len(group):>8.3f}  {sum(o.layer == 'exact' for o in group):>5}  "
            + ", ".join(f"{reason} {count}" for reason, count in vetoes.most_common())
        )


def decide(outcome: Outcome, threshold: float) -> bool:
    return outcome.layer == Layer.EXACT.value or (outcome.similarity >= threshold and not outcome.veto)


def pick_threshold(outcomes: list[Outcome]) -> float:
    labels = [o.pair["same"] for o in outcomes]
    best, best_score = THRESHOLD_GRID[-1], (-1.0, 0.0)
    for threshold in THRESHOLD_GRID:
        precision, _recall, f05 = scores(labels, [decide(o, threshold) for o in outcomes])
        score = (f05 if precision >= PRECISION_FLOOR else -1.0, threshold)  # ties → the stricter
        if score > best_score:
            best, best_score = threshold, score
    return best


def cross_validate(outcomes: list[Outcome], folds: int) -> None:
    shuffled = outcomes[:]
    random.Random(0).shuffle(shuffled)
    chunks = [shuffled[i::folds] for i in range(folds)]
    labels, predictions = [], []
    print(f"\n{folds}-fold cross-validation of the similarity threshold (guards fixed):")
    for index, held_out in enumerate(chunks):
        training = [o for i, chunk in enumerate(chunks) if i != index for o in chunk]
        threshold = pick_threshold(training)
        hits = [decide(o, threshold) for o in held_out]
        precision, recall, f05 = scores([o.pair["same"] for o in held_out], hits)
        print(f"  fold {index + 1}: threshold {threshold:.2f}  precision {precision:.3f}  "
              f"recall {recall:.3f}  F0.5 {f05:.3f}")  # fmt: skip
        labels += [o.pair["same"] for o in held_out]
        predictions += hits
    precision, recall, f05 = scores(labels, predictions)
    print(f"  pooled held-out folds: precision {precision:.3f}  recall {recall:.3f}  F0.5 {f05:.3f}")
    print(f"  threshold picked on all pairs: {pick_threshold(outcomes):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--cv", type=int, default=0, metavar="K", help="cross-validate the threshold")
    args = parser.parse_args(argv)
    pairs = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    threshold = load_config().cache.semantic.similarity_threshold
    with tempfile.TemporaryDirectory(prefix="sophia-eval-redis-") as directory:
        redis_process, port = start_redis(directory)
        try:
            started = time.perf_counter()
            # With --cv every candidate is judged (threshold -1) so that any threshold can be re-decided.
            outcomes = asyncio.run(run_pairs(pairs, port, -1.0 if args.cv else None))
            elapsed = time.perf_counter() - started
        finally:
            redis_process.terminate()
            redis_process.wait(timeout=10)
    if args.cv:
        for outcome in outcomes:
            outcome.hit = decide(outcome, threshold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for o in outcomes:
            line = {
                "id": o.pair["id"],
                "hit": o.hit,
                "similarity": o.similarity,
                "layer": o.layer,
                "veto": o.veto,
            }
            out.write(json.dumps(line) + "\n")
    report(outcomes, threshold)
    print(f"({len(pairs)} pairs in {elapsed:.1f}s)")
    if args.cv:
        cross_validate(outcomes, args.cv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
