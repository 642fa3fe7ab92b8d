"""python -m tools.bench_inference (`make bench-inference`) — continuous batching against one thread per
request.

Starts, on free loopback ports (never against a `make up` mesh), the whole mesh with ModelInference in its
default continuous-batching mode, and beside it a second ModelInference with `scheduler:
thread_per_request` (the path the batcher replaced, `max_concurrent_generations` threads). Then, for each
level of concurrent streams, every stream sends the same kind of request back to back (greedy,
max_tokens 64, a different question per stream) for a warm-up and then a measured window:

* continuous, straight at ModelInference over gRPC (GenerateStream, mTLS as the Gateway);
* continuous, through the edge (POST /v1/chat/completions, streaming, `"cache": false`);
* the thread-per-request baseline over gRPC.

For each it prints the aggregate tokens/s (tokens received inside the window, a request's tokens spread
evenly between its first and last), time to first token p50/p99 (requests sent inside the window; the
warm-up's first burst is left out) and the median per-stream decode rate a client sees, then the ratio of
continuous to baseline tokens/s. The last line is
`RESULT batch_ratio_c16=<x> ttft_p99_ms_c16=<ms> tokens_per_s_c16=<n>` (gRPC figures at 16 streams).
Figures, not a test: they vary with the machine. Exits 1 if a request failed, 2 if the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import yaml

import libs  # noqa: F401  (puts the generated sophia.* stubs on the import path)

# isort: split
from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from libs.config import DEFAULT_CONFIG_PATH, REPO_ROOT, ConfigError
from libs.tls import Identity, mesh_channel
from tools.mesh import Mesh, MeshError
from tools.ports import isolated_environ

MODEL = "smollm2-135m-instruct"
CLIENT_KEY = "sk-sophia-bench-inference"
MAX_TOKENS = 64
MESH_COMPONENTS = ("redis", "inference", "router", "cache", "ledger", "gateway", "envoy")
STARTUP_TIMEOUT_SECONDS = 300.0
TOPICS = (
    "the capital of France", "how bees make honey", "the colour of the sky", "why leaves fall",
    "the largest ocean", "a famous painter", "the boiling point of water", "how to tie a knot",
    "the speed of light", "a good breakfast", "the tallest mountain", "how rainbows form",
    "the history of bread", "how a bicycle works", "why cats purr", "the moon's phases",
)  # fmt: skip


class BenchError(Exception):
    pass


@dataclass
class Timing:
    """One request: when it was sent, when its first and last tokens came, how many tokens it got."""

    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    failure: str = ""


@dataclass
class Measurement:
    label: str
    streams: int
    window: tuple[float, float]
    timings: list[Timing] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [t.failure for t in self.timings if t.failure]

    @property
    def tokens_per_second(self) -> float:
        start, end = self.window
        received = sum(_share_in(t, start, end) for t in self.timings)
        return received / (end - start)

    def _ttfts(self) -> list[float]:
        start, end = self.window
        sent = [t for t in self.timings if start <= t.sent < end]
        # A request still waiting for its first token when the window closed counts with what it waited.
        return [((t.first if t.first is not None else end) - t.sent) * 1000 for t in sent]

    @property
    def ttft_p50_ms(self) -> float:
        return _percentile(self._ttfts(), 50)

    @property
    def ttft_p99_ms(self) -> float:
        return _percentile(self._ttfts(), 99)

    @property
    def stream_tokens_per_second(self) -> float:
        """Median decode rate one client sees: tokens after the first over the time they took."""
        rates = [
            (t.tokens - 1) / (t.last - t.first)
            for t in self.timings
            if t.first is not None and t.last is not None and t.last > t.first and t.tokens > 1
        ]
        return statistics.median(rates) if rates else 0.0


def _share_in(timing: Timing, start: float, end: float) -> float:
    """The request's tokens received within [start, end), spread evenly between its first and last."""
    if timing.first is None or timing.last is None or not timing.tokens:
        return 0.0
    if timing.last == timing.first:
        return timing.tokens if start <= timing.first < end else 0.0
    overlap = min(end, timing.last) - max(start, timing.first)
    return timing.tokens * max(0.0, overlap) / (timing.last - timing.first)


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def question(stream: int, request: int) -> str:
    return f"In a few sentences, tell me about {TOPICS[(stream + request) % len(TOPICS)]}."


# --- clients -------------------------------------------------------------------------------------


async def grpc_request(stub, stream: int, request: int, timing: Timing) -> None:
    call = stub.GenerateStream(
        pb.GenerateStreamRequest(
            model=MODEL,
            messages=[pb.Message(role="user", content=question(stream, request))],
            options=pb.GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0),
        ),
        timeout=600,
    )
    try:
        async for piece in call:
            now = time.monotonic()
            if timing.first is None:
                timing.first = now
            timing.last, timing.tokens = now, piece.completion_tokens
    finally:
        call.cancel()


async def edge_request(
    client: httpx.AsyncClient, url: str, stream: int, request: int, timing: Timing
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question(stream, request)}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache": False,
    }
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with client.stream("POST", url, json=body, headers=headers, timeout=600) as response:
        if response.status_code != 200:
            raise BenchError(f"edge answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            now = time.monotonic()
            if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                timing.first = timing.first or now
                # The local model streams a chunk per token that completes some text: a count that
                # holds for a request the window cuts off, until the usage chunk gives the exact one.
                timing.last, timing.tokens = now, timing.tokens + 1
            if chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]


async def measure(
    label: str, streams: int, warmup: float, seconds: float, send: Callable[[int, int, Timing], Awaitable]
) -> Measurement:
    """`streams` closed loops of requests for warm-up + seconds; requests still open at the end are cut."""
    started = time.monotonic()
    measurement = Measurement(label, streams, (started + warmup, started + warmup + seconds))

    async def loop(stream: int) -> None:
        for request in range(10**9):
            timing = Timing(sent=time.monotonic())
            measurement.timings.append(timing)
            try:
                await send(stream, request, timing)
            except (grpc.aio.AioRpcError, httpx.HTTPError, BenchError) as exc:
                timing.failure = f"{label}: {exc}"
                return

    tasks = [asyncio.create_task(loop(stream)) for stream in range(streams)]
    await asyncio.sleep(max(0.0, measurement.window[1] - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return measurement


# --- set-up --------------------------------------------------------------------------------------


def bench_config() -> dict:
    """The reference config with one client key, so the edge path does its real work (auth, routing,
    rate limits, accounting) against the local model."""
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["auth"]["tenants"] = {"bench": {"api_keys": [{"name": "bench", "key": CLIENT_KEY}]}}
    return config


def start_meshes(state_dir: Path, baseline_threads: int) -> tuple[Mesh, Mesh]:
    config_path = state_dir / "bench.yaml"
    config_path.write_text(yaml.safe_dump(bench_config(), sort_keys=False))
    common = {
        "SOPHIA_CONFIG": str(config_path),
        "SOPHIA__TELEMETRY__LOG_LEVEL": "WARNING",
        "SOPHIA__TLS__DIR": str(state_dir / "certs"),
        "SOPHIA__GATEWAY__OUTBOX_DIR": str(state_dir / "outbox"),
    }
    full = Mesh(state_dir / "continuous", isolated_environ(common))
    baseline = Mesh(
        state_dir / "baseline",
        isolated_environ(
            {
                **common,
                "SOPHIA__INFERENCE__SCHEDULER": "thread_per_request",
                "SOPHIA__INFERENCE__MAX_CONCURRENT_GENERATIONS": str(baseline_threads),
            }
        ),
    )
    print(f"starting {', '.join(MESH_COMPONENTS)} and a baseline inference (logs in {state_dir}) ...")
    for mesh, components in ((full, MESH_COMPONENTS), (baseline, ("inference",))):
        for component in components:
            mesh.start(component)
    full.wait_ready(MESH_COMPONENTS, STARTUP_TIMEOUT_SECONDS)
    baseline.wait_ready(["inference"], STARTUP_TIMEOUT_SECONDS)
    return full, baseline


def inference_channel(mesh: Mesh) -> grpc.aio.Channel:
    return mesh_channel(mesh.address("inference"), mesh.credentials(Identity.GATEWAY), Identity.INFERENCE)


# --- reporting -----------------------------------------------------------------------------------


def print_results(results: dict[tuple[str, int], Measurement], levels: list[int], seconds: float) -> None:
    print(
        f"\ngreedy, max_tokens {MAX_TOKENS}, {seconds:g} s measured per run; tok/s = all streams together, "
        "stream tok/s = median decode rate one client sees"
    )
    header = (
        f"{'streams':>7} | {'path':<26} | {'tok/s':>7} | {'TTFT p50':>9} {'p99 ms':>8} | {'stream tok/s':>12}"
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        for (label, streams), m in results.items():
            if streams == level:
                print(
                    f"{streams:>7} | {label:<26} | {m.tokens_per_second:>7.1f} | {m.ttft_p50_ms:>9.0f} "
                    f"{m.ttft_p99_ms:>8.0f} | {m.stream_tokens_per_second:>12.1f}"
                )
        baseline = results[("baseline gRPC", level)].tokens_per_second
        continuous = results[("continuous gRPC", level)].tokens_per_second
        ratio = continuous / baseline if baseline else float("nan")
        print(f"{'':>7} | continuous / baseline tokens/s: {ratio:.2f}x")


# --- driver --------------------------------------------------------------------------------------


async def run_levels(full: Mesh, baseline: Mesh, levels: list[int], warmup: float, seconds: float):
    results: dict[tuple[str, int], Measurement] = {}
    edge_url = f"{full.edge_url}/v1/chat/completions"
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with (
        inference_channel(full) as continuous_channel,
        inference_channel(baseline) as baseline_channel,
        httpx.AsyncClient(limits=limits) as client,
    ):
        continuous = inference_pb2_grpc.InferenceServiceStub(continuous_channel)
        one_by_one = inference_pb2_grpc.InferenceServiceStub(baseline_channel)
        paths = (
            ("continuous gRPC", lambda s, r, t: grpc_request(continuous, s, r, t)),
            ("continuous through the edge", lambda s, r, t: edge_request(client, edge_url, s, r, t)),
            ("baseline gRPC", lambda s, r, t: grpc_request(one_by_one, s, r, t)),
        )
        for level in levels:
            for label, send in paths:
                print(f"  {level} stream(s), {label} ...", flush=True)
                measured = await measure(label, level, warmup, seconds, send)
                results[(label, level)] = measured
                if measured.failures:
                    raise BenchError(
                        f"{len(measured.failures)} requests failed; first: {measured.failures[0]}"
                    )
    return results


def run(levels: list[int], warmup: float, seconds: float, baseline_threads: int, state_dir: Path) -> int:
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    full = baseline = None
    try:
        full, baseline = start_meshes(state_dir, baseline_threads)
        results = asyncio.run(run_levels(full, baseline, levels, warmup, seconds))
    finally:
        for mesh in (full, baseline):
            if mesh is not None:
                mesh.stop_all()
    print_results(results, levels, seconds)
    level = 16 if 16 in levels else max(levels)
    continuous = results[("continuous gRPC", level)]
    ratio = continuous.tokens_per_second / results[("baseline gRPC", level)].tokens_per_second
    print(
        f"RESULT batch_ratio_c{level}={ratio:.2f} ttft_p99_ms_c{level}={continuous.ttft_p99_ms:.0f} "
        f"tokens_per_s_c{level}={continuous.tokens_per_second:.1f}"
    )
    return 0


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,16") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("every level must be at least 1 stream")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--levels", type=_levels, default=[1, 8, 16, 32], help="concurrent streams (1,8,16,32)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per run (30)")
    parser.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds before each (10)")
    parser.add_argument("--quick", action="store_true", help="1 and 16 streams, 10 s runs after 4 s warm-ups")
    parser.add_argument(
        "--baseline-threads", type=int, default=4, help="the baseline's max_concurrent_generations (4)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=REPO_ROOT / "var" / "bench-inference", help="logs and data"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.seconds, args.warmup = [1, 16], 10.0, 4.0
    if args.seconds <= 0 or args.warmup < 0 or args.baseline_threads < 1:
        parser.error("--seconds must be positive, --warmup at least 0, --baseline-threads at least 1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args.levels, args.warmup, args.seconds, args.baseline_threads, args.state_dir.resolve())
    except BenchError as exc:
        print(f"bench-inference: FAILED: {exc}", file=sys.stderr)
        return 1
    except (MeshError, ConfigError, OSError) as exc:
        print(f"bench-inference: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-inference: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
