"""python -m tools.bench_overload — overload is shed, not queued (`make bench-overload`).

Starts the same mesh as `tools.bench` (fake OpenAI provider, no ModelInference) with admission limits
sized for it, then measures through the edge, with `"cache": false` so every admitted request takes the
full path, spread over several tenants (one key each, rotated per request):

1. uncongested: 1 connection, then `--knee-connections` (8: about where throughput stops growing on
   the 2-core development machine): the knee's requests/s and p99;
2. overload: `--overload-factor` (5) times the knee's rate, offered by many paced connections (each
   waits so that together they send that rate whatever the answers are), so that the refusals do not
   turn into a closed-loop storm of instant retries.

It prints the goodput (200s per second) against the knee, the admitted requests' p50/p99 against the
uncongested p99, and how fast the refusals (429/503) came back. Per-request latencies come from the
edge's access log (Envoy's own duration per request, in ms), split by status; wrk counts the statuses.
The targets (admitted p99 within 2x of the knee's, refusals within 50 ms, goodput at least 90 % of the
knee) are printed as met or not; timings vary with the machine, so they are figures, not a test.
Exits 1 if a request failed other than by being refused, 2 if the benchmark could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from libs.config import REPO_ROOT, ConfigError
from tools.bench import (
    BENCH_MODEL,
    MESH_COMPONENTS,
    STARTUP_TIMEOUT_SECONDS,
    BenchError,
    _stop_process,
    bench_config,
    mesh_environ,
    start_provider,
    wrk_command,
)
from tools.mesh import Mesh, MeshError

TENANTS = ("t1", "t2", "t3", "t4")
REQUEST_TIMEOUT_SECONDS = 10
# Targets from the overload finding (issue 13, finding 5).
TARGET_P99_FACTOR = 2.0
TARGET_REFUSED_MS = 50
TARGET_GOODPUT_SHARE = 0.9

# wrk's loop is C; Lua rotates the tenant keys, paces each connection and counts statuses.
WRK_SCRIPT = r"""
local keys = {}
for key in string.gmatch(os.getenv("BENCH_KEYS"), "[^,]+") do table.insert(keys, key) end
local pause = tonumber(os.getenv("BENCH_DELAY_MS"))
local body = os.getenv("BENCH_BODY")
local threads = {}
local n = 0

function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; refused = 0; failed = 0; sample = "" end
function request()
  n = n + 1
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. keys[(n % #keys) + 1],
  }, body)
end
if pause > 0 then function delay() return pause end end
function response(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 429 or status == 503 then refused = refused + 1
  else
    failed = failed + 1
    if sample == "" then sample = status .. " " .. string.sub(body, 1, 300) end
  end
end
function done(summary, latency, requests)
  local t = {ok = 0, refused = 0, failed = 0}
  local first = ""
  for _, thread in ipairs(threads) do
    for k in pairs(t) do t[k] = t[k] + thread:get(k) end
    if first == "" then first = thread:get("sample") end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"ok":%d,"refused":%d,' ..
    '"failed":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    t.ok, t.refused, t.failed, e.connect + e.read + e.write + e.timeout))
  if first ~= "" then io.write("BENCH-FAILURE " .. first:gsub("\n", " ") .. "\n") end
end
"""


@dataclass
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ok: int
    refused: int
    failed: int
    failure_sample: str

    @property
    def offered_rps(self) -> float:
        return self.requests / self.seconds

    @property
    def goodput_rps(self) -> float:
        return self.ok / self.seconds


def overload_config(provider_url: str, max_inflight: int, tenant_share: float) -> dict:
    config = bench_config(provider_url)
    config["auth"]["tenants"] = {t: {"api_keys": [{"name": t, "key": tenant_key(t)}]} for t in TENANTS}
    config["gateway"].update(max_inflight_requests=max_inflight, max_tenant_share=tenant_share)
    return config


def tenant_key(tenant: str) -> str:
    return f"sk-sophia-bench-{tenant}"


def run_wrk(url: str, script: Path, connections: int, seconds: int, delay_ms: int) -> Run:
    command = wrk_command(url, connections, seconds, script, REQUEST_TIMEOUT_SECONDS)
    body = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    environ = dict(
        os.environ,
        BENCH_BODY=json.dumps({**body, "cache": False}, separators=(",", ":")),
        BENCH_KEYS=",".join(tenant_key(t) for t in TENANTS),
        BENCH_DELAY_MS=str(delay_ms),
    )
    finished = subprocess.run(command, env=environ, capture_output=True, text=True)
    result = re.search(r"^BENCH-RESULT (.*)$", finished.stdout, re.MULTILINE)
    if finished.returncode != 0 or result is None:
        raise BenchError(f"wrk failed ({finished.returncode}): {finished.stderr or finished.stdout}")
    summary = json.loads(result.group(1))
    failure = re.search(r"^BENCH-FAILURE (.*)$", finished.stdout, re.MULTILINE)
    return Run(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        ok=summary["ok"],
        refused=summary["refused"],
        failed=summary["failed"] + summary["socket_errors"],
        failure_sample=failure.group(1) if failure else "",
    )


def edge_durations(log: Path, since: int) -> dict[str, list[int]]:
    """Envoy's duration (ms) of each chat request logged after byte `since`, by HTTP status."""
    by_status: dict[str, list[int]] = {}
    with open(log, "rb") as lines:
        lines.seek(since)
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # Envoy's own log lines
            if isinstance(entry, dict) and entry.get("path") == "/v1/chat/completions":
                by_status.setdefault(str(entry["status"]), []).append(int(entry["duration_ms"]))
    return by_status


def percentile(values: list[int], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(share * len(ordered)))])


def latency_line(rps: float, p50_ms: float, p99_ms: float) -> str:
    return f"{rps:7.0f} req/s  p50 {p50_ms:6.1f} ms  p99 {p99_ms:6.1f} ms"


def report(
    alone: Run, knee: Run, overload: Run, durations: dict[str, list[int]], factor: float, limit: int
) -> bool:
    admitted = durations.get("200", [])
    refused = durations.get("429", []) + durations.get("503", [])
    print(f"\nchat completions through the edge, cache off, {len(TENANTS)} tenants, {limit} in flight")
    print(f"  1 connection      : {latency_line(alone.offered_rps, alone.p50_ms, alone.p99_ms)}")
    print(f"  knee              : {latency_line(knee.offered_rps, knee.p50_ms, knee.p99_ms)}")
    print(
        f"  {factor:g}x the knee offered: {overload.offered_rps:7.0f} req/s; "
        f"{overload.ok} answered, {overload.refused} refused, {overload.failed} failed"
    )
    print(
        f"    goodput         : {overload.goodput_rps:7.0f} req/s "
        f"({overload.goodput_rps / knee.offered_rps:.0%} of the knee)"
    )
    admitted_p99 = percentile(admitted, 0.99)
    print(
        f"    admitted (edge) : p50 {percentile(admitted, 0.5):6.1f} ms  p99 {admitted_p99:6.1f} ms "
        f"({admitted_p99 / knee.p99_ms:.2f}x the knee's p99)"
    )
    refused_p99 = percentile(refused, 0.99)
    print(
        f"    refused (edge)  : p50 {percentile(refused, 0.5):6.1f} ms  p99 {refused_p99:6.1f} ms  "
        f"max {max(refused, default=0)} ms  (429: {len(durations.get('429', []))}, "
        f"503: {len(durations.get('503', []))})"
    )
    targets = {
        f"admitted p99 within {TARGET_P99_FACTOR:g}x the knee's p99": admitted_p99
        <= TARGET_P99_FACTOR * knee.p99_ms,
        f"refusals within {TARGET_REFUSED_MS} ms (p99)": refused_p99 <= TARGET_REFUSED_MS,
        f"goodput at least {TARGET_GOODPUT_SHARE:.0%} of the knee": overload.goodput_rps
        >= TARGET_GOODPUT_SHARE * knee.offered_rps,
    }
    for name, met in targets.items():
        print(f"  {'met    ' if met else 'NOT MET'} {name}")
    failed = alone.failed + knee.failed + overload.failed + alone.refused + knee.refused
    if failed:
        sample = overload.failure_sample or knee.failure_sample or alone.failure_sample
        print(
            f"FAILED: {failed} requests failed (or were refused below the knee); first: {sample}",
            file=sys.stderr,
        )
    return failed == 0


def run(args: argparse.Namespace, state_dir: Path) -> int:
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (make install, or apt-get install wrk)")
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    script = state_dir / "overload.lua"
    script.write_text(WRK_SCRIPT)
    provider, provider_url = start_provider(state_dir)
    mesh = None
    try:
        config_path = state_dir / "overload.yaml"
        config = overload_config(provider_url, args.max_inflight, args.tenant_share)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        mesh = Mesh(state_dir, mesh_environ(state_dir, config_path))
        print(f"starting {', '.join(MESH_COMPONENTS)} (logs in {mesh.log_dir}) ...", flush=True)
        for component in MESH_COMPONENTS:
            mesh.start(component)
        mesh.wait_ready(MESH_COMPONENTS, STARTUP_TIMEOUT_SECONDS)
        url = f"{mesh.edge_url}/v1/chat/completions"
        print("  warm-up, then 1 connection", flush=True)
        run_wrk(url, script, args.knee_connections, 2, 0)
        alone = run_wrk(url, script, 1, args.seconds // 2 or 1, 0)
        print(f"  knee: {args.knee_connections} connections", flush=True)
        knee = run_wrk(url, script, args.knee_connections, args.seconds, 0)
        # Paced connections: each sends every `delay` ms, so together they offer factor x the knee.
        target_rps = args.overload_factor * knee.offered_rps
        delay_ms = max(1, round(1000 * args.overload_connections / target_rps))
        print(
            f"  overload: {args.overload_connections} connections, one request each per {delay_ms} ms "
            f"(about {target_rps:.0f} req/s)",
            flush=True,
        )
        since = mesh.log_path("envoy").stat().st_size
        overload = run_wrk(url, script, args.overload_connections, args.overload_seconds, delay_ms)
        durations = edge_durations(mesh.log_path("envoy"), since)
    finally:
        if mesh is not None:
            mesh.stop_all()
        _stop_process(provider)
    passed = report(alone, knee, overload, durations, args.overload_factor, args.max_inflight)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds at the knee (10)")
    parser.add_argument("--overload-seconds", type=int, default=15, help="measured seconds overloaded (15)")
    parser.add_argument("--knee-connections", type=int, default=8, help="connections at the knee (8)")
    parser.add_argument("--overload-factor", type=float, default=5.0, help="offered load / knee (5)")
    parser.add_argument("--overload-connections", type=int, default=256, help="paced connections (256)")
    parser.add_argument(
        "--max-inflight", type=int, default=16, help="gateway.max_inflight_requests for the run (16)"
    )
    parser.add_argument("--tenant-share", type=float, default=0.5, help="gateway.max_tenant_share (0.5)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=REPO_ROOT / "var" / "bench-overload",
        help="logs (var/bench-overload)",
    )
    args = parser.parse_args(argv)
    if min(args.seconds, args.overload_seconds, args.knee_connections, args.overload_connections) < 1:
        parser.error("durations and connection counts must be at least 1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args, args.state_dir.resolve())
    except (BenchError, MeshError, ConfigError) as exc:
        print(f"bench-overload: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-overload: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
