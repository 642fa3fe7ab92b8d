"""python -m tools.bench_peers — Sophia beside a peer gateway, in one run on one machine (`make bench-peers`).

Starts the fake provider and the mesh as `make bench` does, and the LiteLLM proxy (a widely used Python
LLM gateway, in its own venv, pinned; a peer to measure against, never a dependency of Sophia) through
`litellm_proxy.sh` pointed at the same fake provider. Then, at each level, drives the same small chat
completion with the same wrk load straight at the fake provider, through LiteLLM and through Sophia's edge
(`"cache": false`: the full path, nothing turned off), and prints requests/s, p50/p99, the latency each
gateway adds, the CPU each spends per request, and the ratios Sophia / LiteLLM. It ends with one line:

    RESULT rps_ratio_c64=<x> added_p50_ms_c1=<sophia> litellm_added_p50_ms_c1=<peer>

The peer script is `../shared/bench/peers/litellm_proxy.sh` beside the repository (PEER_SCRIPT moves it);
it installs LiteLLM into /tmp/sophia-peers-venv on first use (about a minute, from PyPI). `--quick` (2 s
warm-up, 5 s per level) keeps the whole run under three minutes. CI does not run it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from libs.config import REPO_ROOT, ConfigError
from tools.bench import (
    PROVIDER_MODEL,
    BenchError,
    Measurement,
    Target,
    bench_mesh,
    check_answers,
    cpu_seconds,
    measure,
    run_wrk,
)
from tools.mesh import MeshError
from tools.ports import free_port

PEER_SCRIPT = Path(
    os.environ.get("PEER_SCRIPT", REPO_ROOT.parent / "shared" / "bench" / "peers" / "litellm_proxy.sh")
)
PEER_KEY = "sk-bench-master"
PEER_WORKERS = 2
PEER_START_TIMEOUT_SECONDS = 600


class Peer:
    """The LiteLLM proxy, started and stopped through its script; its CPU counted over all its processes."""

    def __init__(self, upstream: str, state_dir: Path) -> None:
        if not PEER_SCRIPT.is_file():
            raise BenchError(f"the peer script is not at {PEER_SCRIPT} (set PEER_SCRIPT)")
        self.port = free_port()
        self._upstream = upstream
        self._environ = {**os.environ, "PEERS_STATE": str(state_dir / "litellm")}
        self._pid_file = state_dir / "litellm" / "litellm.pid"

    def _script(self, *args: str, timeout: float) -> None:
        ran = subprocess.run(
            ["bash", str(PEER_SCRIPT), *args],
            env=self._environ,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if ran.returncode != 0:
            raise BenchError(f"litellm_proxy.sh {args[0]} failed: {(ran.stderr or ran.stdout)[-600:]}")

    def start(self) -> None:
        print(f"starting LiteLLM ({PEER_WORKERS} workers) on port {self.port} ...", flush=True)
        self._script(
            "start",
            *("--port", str(self.port), "--upstream", self._upstream),
            *("--model", PROVIDER_MODEL, "--workers", str(PEER_WORKERS)),
            timeout=PEER_START_TIMEOUT_SECONDS,
        )

    def stop(self) -> None:
        self._script("stop", timeout=60)

    def pids(self) -> list[int]:
        """The proxy and its worker processes."""
        root = int(self._pid_file.read_text())
        return [root, *_descendants(root)]

    @property
    def target(self) -> Target:
        body = {"model": PROVIDER_MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
        return Target("litellm", f"http://127.0.0.1:{self.port}/v1/chat/completions", body, PEER_KEY)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def measure_peer(peer: Peer, level: int, seconds: int, warmup: int, script: Path) -> Measurement:
    """Like `measure`, with the CPU of every LiteLLM process summed (its workers are children)."""
    target = peer.target
    print(f"  {level} connection(s), {target.name}: {target.url}", flush=True)
    if warmup:
        run_wrk(target, level, warmup, script, {})
    pids = peer.pids()
    before = sum(cpu_seconds(pid) for pid in pids)
    measurement = run_wrk(target, level, seconds, script, {})
    used = sum(cpu_seconds(pid) for pid in pids) - before
    measurement.cpu_ms_per_request = {"litellm": 1000 * used / max(measurement.requests, 1)}
    return measurement


def print_side_by_side(rows: list[tuple[int, Measurement, Measurement, Measurement]], seconds: int) -> None:
    print(f"\nchat completion, {seconds} s per run, same fake provider, same wrk load, one run")
    header = (
        f"{'conns':>5} | {'direct rps':>10} {'p50':>6} | {'litellm rps':>11} {'p50':>7} {'p99':>7} "
        f"{'added':>6} {'cpu ms':>6} | {'sophia rps':>10} {'p50':>7} {'p99':>7} {'added':>6} {'cpu ms':>6} | "
        f"{'rps x':>5} {'added x':>7}"
    )
    print(header)
    print("-" * len(header))
    for level, direct, peer, sophia in rows:
        peer_added, sophia_added = peer.p50_ms - direct.p50_ms, sophia.p50_ms - direct.p50_ms
        print(
            f"{level:>5} | {direct.rps:>10.0f} {direct.p50_ms:>6.2f} | "
            f"{peer.rps:>11.0f} {peer.p50_ms:>7.2f} {peer.p99_ms:>7.2f} {peer_added:>6.2f} "
            f"{sum(peer.cpu_ms_per_request.values()):>6.2f} | "
            f"{sophia.rps:>10.0f} {sophia.p50_ms:>7.2f} {sophia.p99_ms:>7.2f} {sophia_added:>6.2f} "
            f"{sum(sophia.cpu_ms_per_request.values()):>6.2f} | "
            f"{sophia.rps / max(peer.rps, 1e-9):>5.2f} {sophia_added / max(peer_added, 1e-9):>7.2f}"
        )
    print("(cpu ms: all of each gateway's processes per request — Sophia's edge, services and Redis)")


def result_line(rows: list[tuple[int, Measurement, Measurement, Measurement]]) -> str:
    busiest = max(rows, key=lambda row: row[0])
    quietest = min(rows, key=lambda row: row[0])
    ratio = busiest[3].rps / max(busiest[2].rps, 1e-9)
    sophia_added = quietest[3].p50_ms - quietest[1].p50_ms
    peer_added = quietest[2].p50_ms - quietest[1].p50_ms
    return (
        f"RESULT rps_ratio_c{busiest[0]}={ratio:.2f} added_p50_ms_c{quietest[0]}={sophia_added:.2f} "
        f"litellm_added_p50_ms_c{quietest[0]}={peer_added:.2f}"
    )


def run(levels: list[int], seconds: int, warmup: int, state_dir: Path) -> int:
    rows = []
    with bench_mesh(state_dir, any_provider_key=True) as bench:
        upstream = bench.direct.url.removesuffix("/chat/completions")
        peer = Peer(upstream, state_dir)
        peer.start()
        try:
            check_answers((peer.target,))
            pids = bench.pids
            for level in levels:
                direct = measure(bench.direct, level, seconds, warmup, bench.script, pids)
                via_peer = measure_peer(peer, level, seconds, warmup, bench.script)
                via_sophia = measure(bench.edge, level, seconds, warmup, bench.script, pids)
                rows.append((level, direct, via_peer, via_sophia))
        finally:
            peer.stop()
    print_side_by_side(rows, seconds)
    failed = sum(m.failed for row in rows for m in row[1:])
    print(result_line(rows))
    if failed:
        print(
            f"FAILED: {failed} requests did not get a 200 — the figures above are not valid", file=sys.stderr
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--levels", default="1,8,64", help="concurrent connections (1,8,64)")
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per run (10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured seconds before each run (2)")
    parser.add_argument("--quick", action="store_true", help="2 s warm-up and 5 s per level")
    parser.add_argument("--state-dir", type=Path, default=REPO_ROOT / "var" / "bench-peers")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.levels.split(",")]
    seconds, warmup = (5, 2) if args.quick else (args.seconds, args.warmup)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(levels, seconds, warmup, args.state_dir.resolve())
    except (BenchError, MeshError, ConfigError) as exc:
        print(f"bench-peers: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-peers: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
