"""python -m tools.bench_router [ITEMS.jsonl] — the cost of a Route in the Router's own code, with the
reference config: classification (cue features and both linear models) plus the staged plan (rules,
filters, flags, breaker views, scoring), the embedding excluded (it comes from the cache's lookup).

Prints p50/p95/p99 per Route and per classification, and the embedding's own cost for comparison.
The prompts are ITEMS (default: shared/eval/router_dev.jsonl beside the repository, else the copy
shipped in config/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import sys
import time

from redis.asyncio import Redis

from libs.config import REPO_ROOT, load_config
from libs.sentence_embeddings import EMBEDDING_MODEL_ID, load_embedding_model
from services.router.classifier import conversation_parts
from services.router.embedder import PromptEmbedder
from services.router.health import HealthBook
from services.router.reloader import build_state
from services.router.router import Preference, Request, Router

TARGET_P99_MS = 2.0
DEFAULT_ITEMS = REPO_ROOT.parent / "shared" / "eval" / "router_dev.jsonl"
# The same prompts, shipped as classifier examples: used when the shared file is not there.
SHIPPED_ITEMS = REPO_ROOT / "config" / "router_examples_dev.jsonl"


def _percentiles(samples_ms: list[float]) -> str:
    ordered = sorted(samples_ms)

    def at(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return f"p50 {at(0.50):.3f} ms  p95 {at(0.95):.3f} ms  p99 {at(0.99):.3f} ms  max {ordered[-1]:.3f} ms"


def _conversations(path: pathlib.Path) -> list[tuple[str, str]]:
    if not path.is_file():
        path = SHIPPED_ITEMS
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [conversation_parts(item["messages"]) for item in items]


async def bench(items_path: pathlib.Path, rounds: int) -> None:
    config = load_config()
    embedder = PromptEmbedder(load_embedding_model(EMBEDDING_MODEL_ID, device="cpu"))
    state = build_state(config, embedder)
    conversations = _conversations(items_path)
    started = time.perf_counter()
    vectors = embedder.embed_prompts([prompt for prompt, _ in conversations])
    embed_ms = (time.perf_counter() - started) * 1000 / len(conversations)
    single = []
    for prompt, _ in conversations[:20]:
        started = time.perf_counter()
        embedder.embed_prompts([prompt])
        single.append((time.perf_counter() - started) * 1000)
    # The breaker views are read in memory; Redis is never reached on this path.
    router = Router(state, HealthBook(Redis(), config.routing.breaker))
    requests = [
        Request(
            tenant_id=f"tenant-{n % 50}",
            prompt=prompt,
            context=context,
            embedding=vector.tolist(),
            estimated_tokens=len(prompt) // 3 + 256,
            preference=(None, Preference.FAST, Preference.QUALITY, Preference.BALANCED)[n % 4],
            budget_used_fraction=0.9 if n % 10 == 0 else None,
        )
        for n, ((prompt, context), vector) in enumerate(zip(conversations, vectors, strict=True))
    ]
    for request in requests[:50]:  # warm-up
        await router.route(request)
    route_ms, route_cpu_ms, classify_ms = [], [], []
    for _ in range(rounds):
        for request in requests:
            started, started_cpu = time.perf_counter(), time.thread_time()
            plan = await router.route(request)
            route_ms.append((time.perf_counter() - started) * 1000)
            route_cpu_ms.append((time.thread_time() - started_cpu) * 1000)
            classify_ms.append(plan.classify_seconds * 1000)
    p99 = sorted(route_ms)[int(0.99 * len(route_ms))]
    print(f"{len(requests)} prompts × {rounds} rounds = {len(route_ms)} Routes (reference config, CPU)")
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs (wall times include waiting for a CPU)")
    print(f"Route, embedding excluded:    {_percentiles(route_ms)}")
    print(f"  CPU time per Route:         {_percentiles(route_cpu_ms)}")
    print(f"  of which classification:    {_percentiles(classify_ms)}")
    print(f"  mean {statistics.fmean(route_ms):.3f} ms per Route")
    print(
        f"embedding (for comparison):   batched {embed_ms:.1f} ms per prompt; "
        f"one at a time {_percentiles(single)}"
    )
    cpu_p99 = sorted(route_cpu_ms)[int(0.99 * len(route_cpu_ms))]
    for what, value in (("CPU time", cpu_p99), ("wall time", p99)):
        verdict = "meets" if value <= TARGET_P99_MS else "misses"
        print(
            f"Route p99 {what} {value:.3f} ms vs target {TARGET_P99_MS} ms: {verdict} "
            f"({value / TARGET_P99_MS:.2f}x of the budget)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "items", nargs="?", default=str(DEFAULT_ITEMS), help="prompts (router_dev.jsonl format)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    asyncio.run(bench(pathlib.Path(args.items), args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
