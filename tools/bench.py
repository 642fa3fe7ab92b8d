"""python -m tools.bench — what the mesh adds to a chat completion (`make bench`).

Starts the fake OpenAI provider and the mesh (Redis, Router, SemanticCache, CostLedger, Gateway, Envoy;
no ModelInference: the benchmark model lives on the fake provider) on free loopback ports, then drives
the same small chat completion at each concurrency level twice: straight at the fake provider, and
through the edge with `"cache": false`, so every request takes the full path (auth, routing, provider
call over HTTP, accounting) instead of being answered from the cache. Prints requests/s and p50/p99
latency for both, the latency the mesh adds, and the CPU each process spent per request.

The load comes from `wrk` (one thread, keep-alive connections): on a small machine the client shares the
cores with Envoy, the Gateway and the provider, so it has to be a cheap one. Exits 1 if any request
failed (a non-200 answer, a socket error or a timeout), 2 if the benchmark could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from libs.config import DEFAULT_CONFIG_PATH, REPO_ROOT, ConfigError
from tools.mesh import COMPONENTS, Mesh, MeshError
from tools.ports import free_port_block, isolated_environ

BENCH_MODEL = "bench-model"
PROVIDER_MODEL = "fake-gpt"
PROVIDER_KEY_ENV = "SOPHIA_BENCH_PROVIDER_KEY"
PROVIDER_KEY = "sk-fake-bench-provider"
CLIENT_KEY = "sk-sophia-bench"
# Inference is left out: nothing on the benchmarked path calls the local model.
MESH_COMPONENTS = tuple(c for c in COMPONENTS if c != "inference")
STARTUP_TIMEOUT_SECONDS = 180.0
# Latency is measured by wrk itself; a request slower than this counts as failed.
REQUEST_TIMEOUT_SECONDS = 10

# wrk's per-connection loop is C; the Lua hooks only count failures and report the summary as JSON.
WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) failed = 0; first_failure = "" end
function response(status, headers, body)
  if status ~= 200 then
    failed = failed + 1
    if first_failure == "" then first_failure = status .. " " .. string.sub(body, 1, 300) end
  end
end
function done(summary, latency, requests)
  local non200, sample = 0, ""
  for _, thread in ipairs(threads) do
    non200 = non200 + thread:get("failed")
    if sample == "" then sample = thread:get("first_failure") end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non200":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), non200,
    e.connect + e.read + e.write + e.timeout))
  if sample ~= "" then io.write("BENCH-FAILURE " .. sample:gsub("\n", " ") .. "\n") end
end
"""


@dataclass
class Measurement:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    failed: int
    failure_sample: str
    cpu_ms_per_request: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Target:
    name: str  # "direct" or "edge"
    url: str
    body: dict
    key: str


class BenchError(Exception):
    pass


# --- set-up --------------------------------------------------------------------------------------


BENCH_KEY_LIMITS = {"requests_per_minute": 100_000_000, "tokens_per_minute": 10_000_000_000}


def bench_config(provider_url: str) -> dict:
    """The reference config plus a paid model on the fake provider, chosen by default, and one client key."""
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["providers"]["fake"] = {
        "type": "openai",
        "base_url": f"{provider_url}/v1",
        "api_key_env": PROVIDER_KEY_ENV,
    }
    config["models"][BENCH_MODEL] = {
        "provider": "fake",
        "kind": "chat",
        "provider_model": PROVIDER_MODEL,
        "context_window": 16384,
        "owned_by": "bench",
    }
    config["routing"]["default_chain"] = [BENCH_MODEL]
    # Priced like a real hosted model, so the cost accounting does its real work.
    prices = config.setdefault("ledger", {}).setdefault("prices", {})
    prices[BENCH_MODEL] = {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.60}
    # Limits the load never reaches: every request still goes through the limiter's Redis scripts (one to
    # admit, one to charge the tokens used), as a limited key's requests do in production.
    key = {"name": "bench", "key": CLIENT_KEY, **BENCH_KEY_LIMITS}
    config["auth"]["tenants"] = {"bench": {"api_keys": [key]}}
    return config


def mesh_environ(state_dir: Path, config_path: Path) -> dict[str, str]:
    return isolated_environ(
        {
            "SOPHIA_CONFIG": str(config_path),
            # Metrics are recorded and served as in production, on ports that never meet `make up`.
            "SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT": str(free_port_block(5)),
            # Logging per request is not what we measure; everything on the request path stays on.
            "SOPHIA__TELEMETRY__LOG_LEVEL": "WARNING",
            "SOPHIA__GATEWAY__OUTBOX_DIR": str(state_dir / "outbox"),
            PROVIDER_KEY_ENV: PROVIDER_KEY,
        }
    )


def start_provider(state_dir: Path, *, any_key: bool = False) -> tuple[subprocess.Popen, str]:
    """The fake provider as its own process (the Gateway reaches it over real HTTP); returns its URL. It
    takes only the Gateway's provider key, or with `any_key` any key (a peer gateway brings its own)."""
    log = open(state_dir / "provider.log", "wb")
    key_options = [] if any_key else ["--api-key", PROVIDER_KEY]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.provider", "--port", "0", *key_options],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    log.close()
    line = process.stdout.readline().decode(errors="replace")
    process.stdout.close()
    found = re.search(r"listening on (http://\S+)", line)
    if found is None:
        process.kill()
        process.wait()
        raise BenchError(f"the fake provider did not start: {line!r}; see {state_dir / 'provider.log'}")
    return process, found.group(1)


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_answers(targets: tuple[Target, ...]) -> None:
    """One request each way before the load: both echo the prompt, and the edge's came from the provider."""
    for target in targets:
        url = target.url
        request = urllib.request.Request(
            url,
            data=json.dumps(target.body).encode(),
            headers={"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                answer, headers = json.load(response), response.headers
        except urllib.error.HTTPError as exc:
            raise BenchError(f"{url} answered {exc.code}: {exc.read()[:300]!r}") from None
        except (OSError, ValueError) as exc:
            raise BenchError(f"{url} gave no usable answer: {exc}") from None
        if answer.get("choices", [{}])[0].get("message", {}).get("content") != "hello":
            raise BenchError(f"{url} did not echo the prompt: {answer}")
        if target.name == "edge" and headers.get("x-sophia-provider") != "fake":
            raise BenchError(
                f"the edge was answered by {headers.get('x-sophia-provider')!r} "
                f"(cache {headers.get('x-sophia-cache')!r}), not by the fake provider"
            )


# --- measuring -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); the split above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_command(url: str, connections: int, seconds: int, script: Path, timeout_seconds: float) -> list[str]:
    """One wrk thread (wrk shares the two cores with what it measures) driving `script` at `url`."""
    return [
        "wrk",
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{seconds}s",
        "--timeout",
        f"{timeout_seconds}s",
        "--script",
        str(script),
        url,
    ]


def run_wrk(
    target: Target, connections: int, seconds: int, script: Path, pids: dict[str, int]
) -> Measurement:
    command = wrk_command(target.url, connections, seconds, script, REQUEST_TIMEOUT_SECONDS)
    body = json.dumps(target.body, separators=(",", ":"))
    environ = dict(os.environ, BENCH_BODY=body, BENCH_KEY=target.key)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    finished = subprocess.run(command, env=environ, capture_output=True, text=True)
    cpu_used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    result = re.search(r"^BENCH-RESULT (.*)$", finished.stdout, re.MULTILINE)
    if finished.returncode != 0 or result is None:
        raise BenchError(f"wrk failed ({finished.returncode}): {finished.stderr or finished.stdout}")
    summary = json.loads(result.group(1))
    failure = re.search(r"^BENCH-FAILURE (.*)$", finished.stdout, re.MULTILINE)
    requests = summary["requests"]
    return Measurement(
        requests=requests,
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        failed=summary["non200"] + summary["socket_errors"],
        failure_sample=failure.group(1) if failure else "",
        cpu_ms_per_request={name: 1000 * cpu / max(requests, 1) for name, cpu in cpu_used.items()},
    )


# --- reporting -----------------------------------------------------------------------------------


def print_results(results: list[tuple[int, Measurement, Measurement]], seconds: int) -> None:
    print(
        f"\nchat completion, {seconds} s per run; direct = straight at the fake provider, "
        "edge = through Envoy and the mesh with cache off"
    )
    header = (
        f"{'conns':>5} | {'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'edge rps':>8} {'p50 ms':>7} {'p99 ms':>7} | {'added p50':>9} {'added p99':>9} | {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for level, direct, edge in results:
        print(
            f"{level:>5} | {direct.rps:>10.0f} {direct.p50_ms:>7.2f} {direct.p99_ms:>7.2f} | "
            f"{edge.rps:>8.0f} {edge.p50_ms:>7.2f} {edge.p99_ms:>7.2f} | "
            f"{edge.p50_ms - direct.p50_ms:>9.2f} {edge.p99_ms - direct.p99_ms:>9.2f} | "
            f"{direct.failed + edge.failed:>6}"
        )

    names = list(results[0][2].cpu_ms_per_request)
    print("\nCPU ms per request through the edge (all processes share the same cores):")
    print(f"{'conns':>5} | " + " ".join(f"{name:>8}" for name in names) + f" | {'total':>6}")
    for level, _, edge in results:
        cpu = edge.cpu_ms_per_request
        print(f"{level:>5} | " + " ".join(f"{cpu[n]:>8.2f}" for n in names) + f" | {sum(cpu.values()):>6.2f}")

    busiest = max(results, key=lambda r: r[2].rps)
    quietest = min(results, key=lambda r: r[0])
    level, _, edge = busiest
    added_alone = quietest[2].p50_ms - quietest[1].p50_ms
    # No ratio to a figure from another machine or day: a peer is compared only when run beside Sophia.
    print(
        f"\nsophia: {edge.rps:.0f} requests/s at {level} connections; "
        f"added p50 {added_alone:.2f} ms at {quietest[0]} connection(s)"
    )


def report_failures(results: list[tuple[int, Measurement, Measurement]]) -> int:
    failed = 0
    for level, direct, edge in results:
        for where, measurement in (("direct", direct), ("edge", edge)):
            if measurement.failed:
                failed += measurement.failed
                print(
                    f"FAILED: {measurement.failed} of {measurement.requests} {where} requests at "
                    f"{level} connections; first: {measurement.failure_sample or '(socket error/timeout)'}",
                    file=sys.stderr,
                )
    if failed:
        print(
            f"FAILED: {failed} requests did not get a 200 — the figures above are not valid", file=sys.stderr
        )
    return failed


# --- driver --------------------------------------------------------------------------------------


@dataclass
class BenchMesh:
    """The fake provider and the mesh in front of it, both ready, with the two ways to reach the model."""

    mesh: Mesh
    provider: subprocess.Popen
    direct: Target
    edge: Target
    script: Path

    @property
    def targets(self) -> tuple[Target, Target]:
        return self.direct, self.edge

    @property
    def pids(self) -> dict[str, int]:
        pids = {
            name: self.mesh.processes[name].pid for name in ("envoy", "gateway", "router", "ledger", "redis")
        }
        return {**pids, "provider": self.provider.pid}


@contextlib.contextmanager
def bench_mesh(state_dir: Path, *, any_provider_key: bool = False) -> Iterator[BenchMesh]:
    """Starts the fake provider and the mesh on free ports under `state_dir`; stops both afterwards."""
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (make install, or apt-get install wrk)")
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    script = state_dir / "chat.lua"
    script.write_text(WRK_SCRIPT)
    provider, provider_url = start_provider(state_dir, any_key=any_provider_key)
    mesh = None
    try:
        config_path = state_dir / "bench.yaml"
        config_path.write_text(yaml.safe_dump(bench_config(provider_url), sort_keys=False))
        mesh = Mesh(state_dir, mesh_environ(state_dir, config_path))
        print(f"starting {', '.join(MESH_COMPONENTS)} (logs in {mesh.log_dir}) ...", flush=True)
        for component in MESH_COMPONENTS:
            mesh.start(component)
        mesh.wait_ready(MESH_COMPONENTS, STARTUP_TIMEOUT_SECONDS)
        message = {"role": "user", "content": "hello"}
        direct = Target(
            "direct",
            f"{provider_url}/v1/chat/completions",
            {"model": PROVIDER_MODEL, "messages": [message], "max_tokens": 16},
            PROVIDER_KEY,
        )
        edge = Target(
            "edge",
            f"{mesh.edge_url}/v1/chat/completions",
            {"model": BENCH_MODEL, "messages": [message], "max_tokens": 16, "cache": False},
            CLIENT_KEY,
        )
        check_answers((direct, edge))
        yield BenchMesh(mesh, provider, direct, edge, script)
    finally:
        if mesh is not None:
            mesh.stop_all()
        _stop_process(provider)


def measure(
    target: Target, level: int, seconds: int, warmup: int, script: Path, pids: dict[str, int]
) -> Measurement:
    print(f"  {level} connection(s), {target.name}: {target.url}", flush=True)
    if warmup:
        run_wrk(target, level, warmup, script, pids)
    return run_wrk(target, level, seconds, script, pids)


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def print_memory(rounds: list[dict[str, float]]) -> None:
    """RSS of each process after each round of load: it must not keep growing."""
    names = list(rounds[0])
    print("\nRSS MiB after each round of load:")
    print(f"{'round':>5} | " + " ".join(f"{name:>8}" for name in names))
    for number, rss in enumerate(rounds, start=1):
        print(f"{number:>5} | " + " ".join(f"{rss[n]:>8.1f}" for n in names))


def run(levels: list[int], seconds: int, warmup: int, state_dir: Path, rounds: int = 1) -> int:
    with bench_mesh(state_dir) as bench:
        pids = bench.pids
        results = []
        memory: list[dict[str, float]] = []
        for _ in range(rounds):
            results = [
                (
                    level,
                    *(
                        measure(t, level, seconds, warmup, bench.script, pids)
                        for t in (bench.direct, bench.edge)
                    ),
                )
                for level in levels
            ]
            memory.append({name: rss_mib(pid) for name, pid in pids.items()})
    print_results(results, seconds)
    print_memory(memory)
    return 1 if report_failures(results) else 0


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers, e.g. 1,8,64"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("every level must be at least 1 connection")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--levels", type=_levels, default=[1, 8, 64], help="concurrent connections (1,8,64)")
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per run (10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured seconds before each run (2)")
    parser.add_argument(
        "--state-dir", type=Path, default=REPO_ROOT / "var" / "bench", help="logs and data (var/bench)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the whole load this often; RSS is shown after each (1)"
    )
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.warmup < 0:
        parser.error("--seconds must be at least 1 and --warmup at least 0")

    # `kill` gets the same clean shutdown as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args.levels, args.seconds, args.warmup, args.state_dir.resolve(), max(1, args.rounds))
    except (BenchError, MeshError, ConfigError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
