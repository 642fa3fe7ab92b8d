"""Benchmark of the SemanticCache: lookups through its gRPC API, and FAISS search alone.

    python -m tools.bench_cache [--seconds 8] [--sizes 10000,100000] [--concurrency 1,16,64]
                                [--set 'int8=true|false' --set embedding_workers=2] [--service-only]

For each index size, a throwaway Redis is filled with that many entries of one tenant and one scope
(random unit vectors, written with the service's own EntryStore), the cache service is started as a
process (mTLS, as in production) and rebuilds its index from Redis; then lookups of real questions run
at each concurrency for a fixed time after a one-second ramp that is not timed, each question embedded
by the service (the embedding is the cost that dominates). Printed: lookups/s, p50 and p99 latency,
the service's CPU time per lookup (the figure that depends least on what else runs), and the index
rebuild time. Last, FAISS search alone (`services.cache.index.VectorIndex`) at 100k and 1M vectors,
flat and IVF; `--service-only` skips the model alone and the search alone.
The embedding model alone is measured first: every lookup that is not an exact hit embeds its question,
so that throughput is the ceiling. Figures are printed, never asserted: they depend on the machine and
on what else runs on it (the load average is printed beside them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

from services.cache import keys
from services.cache.entries import EntryStore
from services.cache.index import VectorIndex, _flat, _Partition
from services.cache.servicer import cache_pb2_grpc, pb
from tests.support import internal_channel, mesh_environ
from tools.bench import cpu_seconds
from tools.mesh import Mesh

TENANT = "bench"
MODEL = "bench-model"
SCOPE = '{"model":"bench-model"}'
DIMENSIONS = 384
# At each concurrency, lookups are sent for this long before any is counted.
RAMP_SECONDS = 1.0
QUESTIONS = [
    f"{opener} {subject}?"
    for opener in ("How do I", "What is the best way to", "Can you explain how to", "Why would I")
    for subject in (
        "reset my voicemail pin", "export contacts to a csv file", "merge two dataframes in pandas",
        "calculate year over year growth", "renew a lease for unit {n}", "cancel a recurring invoice",
        "set up two factor authentication", "fix a merge conflict in git", "write a cold email to a cfo",
        "compute the median of a column", "handle a customer asking for a refund after {n} days",
    )
]  # fmt: skip


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def fill(redis_url: str, entries: int) -> float:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, decode_responses=False, max_connections=256)
    store = EntryStore(redis)
    rng = np.random.default_rng(1)
    partition = keys.scope_digest(TENANT, MODEL, SCOPE)
    started = time.perf_counter()
    batch = 200
    for start in range(0, entries, batch):
        vectors = rng.standard_normal((batch, DIMENSIONS)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        await asyncio.gather(
            *(
                store.put(
                    TENANT,
                    keys.entry_member(MODEL, f"{start + i:064x}"),
                    {"question": f"cached question {start + i}", "response": b"{}", "scope": partition,
                     "end": "complete", "vector": vectors[i].tobytes()},
                    ttl_seconds=3600,
                    max_entries=entries + 1,
                )
                for i in range(min(batch, entries - start))
            )
        )  # fmt: skip
    await redis.aclose()
    return time.perf_counter() - started


async def run_lookups(
    mesh: Mesh, concurrency: int, seconds: float, ramp_seconds: float = 0.0
) -> tuple[int, list[float]]:
    """Lookups from `concurrency` clients for `ramp_seconds` (not timed: all clients start at once, and
    the first batches queue behind each other before the load is steady), then for `seconds`. Returns
    how many lookups were made in all, and the latencies of those started after the ramp."""
    latencies: list[float] = []
    made = 0
    async with internal_channel(mesh, "cache") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        counted_from = time.perf_counter() + ramp_seconds
        deadline = counted_from + seconds
        counter = iter(range(10**9))

        async def worker() -> None:
            nonlocal made
            while time.perf_counter() < deadline:
                n = next(counter)
                question = QUESTIONS[n % len(QUESTIONS)].replace("{n}", str(n))
                started = time.perf_counter()
                await stub.Lookup(
                    pb.LookupRequest(
                        tenant_id=TENANT, model=MODEL, scope=SCOPE, question=question, semantic=True
                    ),
                    timeout=30,
                )
                made += 1
                if started >= counted_from:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return made, latencies


def bench_service(entries: int, concurrencies: list[int], seconds: float, semantic: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="sophia-bench-cache-") as directory:
        settings = {"SOPHIA__TLS__MODE": "mtls"}
        settings |= {f"SOPHIA__CACHE__SEMANTIC__{name.upper()}": value for name, value in semantic.items()}
        mesh = Mesh(pathlib.Path(directory), mesh_environ(settings))
        try:
            mesh.start("redis")
            mesh.wait_ready(["redis"], timeout=30)
            filled = asyncio.run(fill(mesh.config.redis.url, entries))
            started = time.perf_counter()
            service = mesh.start("cache")
            mesh.wait_ready(["cache"], timeout=600)
            ready = time.perf_counter() - started
            shown = ", ".join(f"{name} {value}" for name, value in semantic.items()) or "reference config"
            print(f"\n{entries:,} entries in the tenant's index, {shown} (filled in {filled:.0f}s; service "
                  f"start with model load and index rebuild {ready:.1f}s)")  # fmt: skip
            asyncio.run(run_lookups(mesh, 4, 2.0))  # warm-up
            print(f"{'concurrent':>10} {'lookups/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/lookup':>14}"
                  "   (1-minute load average)")  # fmt: skip
            for concurrency in concurrencies:
                used = cpu_seconds(service.pid)
                made, latencies = asyncio.run(run_lookups(mesh, concurrency, seconds, RAMP_SECONDS))
                used = cpu_seconds(service.pid) - used
                p50, p99 = statistics.median(latencies) * 1000, percentile(latencies, 0.99) * 1000
                load = os.getloadavg()[0]
                print(f"{concurrency:>10} {len(latencies) / seconds:>10.0f} {p50:>8.1f} {p99:>8.1f} "
                      f"{used / made * 1000:>14.2f}   (load {load:.1f})")  # fmt: skip
        finally:
            mesh.stop_all()


def bench_model(seconds: float) -> None:
    """The embedding model alone, in this process, as the service runs it (one thread), with each
    runtime: the ceiling for lookups that embed (every lookup that is not an exact hit). Texts per second
    of wall time and per second of CPU time (steadier on a shared machine)."""
    import torch

    from libs.config import EmbeddingRuntime, load_config
    from libs.sentence_embeddings import EMBEDDING_MODEL_ID, load_embedding_model, normalise_text

    config = load_config()
    settings = config.cache.semantic
    torch.set_num_threads(settings.embedding_threads or torch.get_num_threads())
    texts = [normalise_text(q.replace("{n}", str(n))) for n, q in enumerate(QUESTIONS)]
    variants = [
        ("torch float32", EmbeddingRuntime.TORCH, False),
        ("torch int8", EmbeddingRuntime.TORCH, True),
        ("onnxruntime float32", EmbeddingRuntime.ONNXRUNTIME, False),
        ("onnxruntime int8", EmbeddingRuntime.ONNXRUNTIME, True),
    ]
    models = {
        name: load_embedding_model(
            EMBEDDING_MODEL_ID, config.inference.weights_dir, settings.device, int8=quantised,
            runtime=runtime, threads=settings.embedding_threads,
        )
        for name, runtime, quantised in variants
    }  # fmt: skip
    reference = models["torch float32"].embed_array(texts)
    print(f"\nembedding model alone ({torch.get_num_threads()} thread(s)), texts/s (per CPU-second):")
    for name, model in models.items():
        agreement = float(np.min(np.sum(model.embed_array(texts) * reference, axis=1)))
        figures = []
        for batch in (1, 8, 16, 32):
            model.embed_array(texts[:batch])
            done, started, cpu = 0, time.perf_counter(), time.thread_time()
            while time.perf_counter() - started < seconds:
                model.embed_array(texts[:batch])
                done += batch
            wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
            figures.append(f"batch {batch:>2}: {done / wall:4.0f} ({done / cpu:4.0f})")
        print(f"  {name:<20} {'   '.join(figures)}   min cosine to torch float32 {agreement:.6f}"
              f"   (load {os.getloadavg()[0]:.1f})")  # fmt: skip


def bench_search(sizes: list[int], repeats: int = 50) -> None:
    print("\nFAISS search alone (one query, k=4, one thread):")
    rng = np.random.default_rng(2)
    for size in sizes:
        vectors = rng.standard_normal((size, DIMENSIONS)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = vectors[rng.choice(size, repeats)] + 0.01
        for kind, ivf_min in (("flat", size + 1), ("ivf", 1)):
            index = VectorIndex(DIMENSIONS, ivf_min_entries=ivf_min)
            started = time.perf_counter()
            # Bulk load for the bench only (the service adds entries one by one).
            part = index._partitions["p"] = _Partition(_flat(DIMENSIONS))
            part.index.add_with_ids(vectors, np.arange(size, dtype=np.int64))
            part.ids = set(range(size))
            if kind == "ivf":
                index._swap_in(part, index._build_ivf(vectors, np.arange(size, dtype=np.int64)))
            built = time.perf_counter() - started
            timings = []
            for query in queries[: (10 if size >= 1_000_000 and kind == "flat" else repeats)]:
                started = time.perf_counter()
                index.search("p", query, 4)
                timings.append(time.perf_counter() - started)
            print(f"  {size:>9,} {kind:<4}  p50 {statistics.median(timings) * 1000:7.2f} ms  "
                  f"p99 {percentile(timings, 0.99) * 1000:7.2f} ms  (built in {built:.1f}s)")  # fmt: skip
            del index, part


def service_settings(assignments: list[str]) -> list[dict[str, str]]:
    """The cache.semantic settings of each service run: one run per combination of the values given."""
    runs: list[dict[str, str]] = [{}]
    for assignment in assignments:
        name, _, values = assignment.partition("=")
        runs = [run | {name: value} for run in runs for value in values.split("|")]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description="SemanticCache benchmark")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--search-sizes", default="100000,1000000")
    parser.add_argument(
        "--service-only", action="store_true", help="skip the embedding model alone and the search alone"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="a cache.semantic setting for the service, e.g. embedding_runtime=torch (repeatable); "
        "--set with several values separated by | runs the service once per value",
    )  # fmt: skip
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"{os.cpu_count()} CPUs; 1-minute load average before the bench {os.getloadavg()[0]:.1f}")
    if not args.service_only:
        bench_model(min(args.seconds, 3.0))
    for size in (int(s) for s in args.sizes.split(",") if s):
        for semantic in service_settings(args.set):
            bench_service(size, concurrencies, args.seconds, semantic)
    if not args.service_only:
        bench_search([int(s) for s in args.search_sizes.split(",") if s])


if __name__ == "__main__":
    main()
