"""Every metric the dashboards, alerts and autoscaling use is really exported, and every dashboard
query returns data: a live mesh gets traffic that exercises each instrument (an exact and a semantic
cache hit, a vetoed semantic candidate, an eviction at the entry limit, a provider that fails and falls
back, admission and ModelInference refusing, a bad request, a stream, embeddings, a tenant projected
over its budget),
each service's Prometheus endpoint is scraped, and a real Prometheus with the deployment's rules
scrapes the same endpoints under the deployment's job names and answers every dashboard query.

The images' own commands run here too: the container health check against each live service, and
the edge's entry point (deploy/docker/edge.py) serving a request through to the Gateway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from libs.config import REPO_ROOT, InferenceConfig
from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tests.integration.conftest import DEV_KEY, full_mesh_environ, metrics_url, start_full_mesh
from tests.support import free_port
from tools.deploy_check import monitoring
from tools.deploy_check.promql import substitute_grafana_variables
from tools.mesh import SERVICES

pytestmark = pytest.mark.integration

LOCAL_MODEL = "smollm2-135m-instruct"
ADMIN_KEY = "sk-test-admin-key-metrics"
BROKEN_MODEL = "brokenmodel"
PROMETHEUS = REPO_ROOT / ".venv" / "bin" / "prometheus"
HEALTHCHECK = REPO_ROOT / "deploy" / "docker" / "healthcheck.py"
EDGE_ENTRY = REPO_ROOT / "deploy" / "docker" / "edge.py"
# Grafana's intervals, shortened to what a one-second scrape fills within the test.
TEST_DURATIONS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    environ = full_mesh_environ(tmp_path_factory, DEV_KEY, ADMIN_KEY)
    environ.update(
        {
            # A provider nothing listens for: every attempt fails and falls back to the local model.
            "SOPHIA__PROVIDERS__BROKEN": (
                f"{{type: openai, base_url: 'http://127.0.0.1:{free_port()}/v1', api_key_env: BROKEN_KEY}}"
            ),
            "BROKEN_KEY": "sk-test-broken-provider",
            "SOPHIA__MODELS__BROKENMODEL": "{provider: broken, kind: chat}",
            "SOPHIA__ROUTING__FALLBACK_MAP": f"{{{BROKEN_MODEL}: [{LOCAL_MODEL}]}}",
            # Small limits, so that a burst of a few requests makes admission and ModelInference refuse.
            "SOPHIA__GATEWAY__MAX_INFLIGHT_REQUESTS": "2",
            "SOPHIA__GATEWAY__MAX_TENANT_SHARE": "1",
            "SOPHIA__INFERENCE__MAX_CONCURRENT_GENERATIONS": "1",
            "SOPHIA__INFERENCE__MAX_QUEUED_GENERATIONS": "0",
            # One cached answer per tenant: a second one evicts the first.
            "SOPHIA__CACHE__MAX_ENTRIES_PER_TENANT": "1",
            # The local model at $1 per thousand tokens against a $1 budget (set in the traffic), projected
            # from the first record on. The ledger counts a projection alert for a threshold the
            # projection reaches and the spend has not: each answer (about 50 tokens) moves the spend by
            # about 5 %, so on any day of the month it passes below 100 % while its projection is above.
            "SOPHIA__LEDGER__PRICES": json.dumps(
                {LOCAL_MODEL: {"input_per_mtok_usd": 1000, "output_per_mtok_usd": 1000}}
            ),
            "SOPHIA__LEDGER__PROJECTION_MIN_ELAPSED_HOURS": "0",
        }
    )
    # ModelInference runs one generation and queues none, whichever scheduler it has: one thread per
    # request (max_concurrent_generations) or continuous batching (max_batch_size, issue 8).
    if "max_batch_size" in InferenceConfig.model_fields:
        environ["SOPHIA__INFERENCE__MAX_BATCH_SIZE"] = "1"
    running = start_full_mesh(tmp_path_factory.mktemp("metrics-mesh"), environ)
    try:
        yield running
    finally:
        running.stop_all()


def _post(url: str, body: dict, *, key: str = DEV_KEY, method: str = "POST") -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _chat(model: str, text: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def _burst(mesh, calls: int) -> list[grpc.StatusCode]:
    """Concurrent chats straight at the Gateway's gRPC port (the edge would shed them itself)."""
    params = gateway_pb2.ChatCompletionParams(
        model=LOCAL_MODEL,
        messages=[gateway_pb2.ChatMessage(role="user", text="Count to twenty.")],
        max_tokens=24,
    )
    request = gateway_pb2.CreateChatCompletionRequest(params=params)
    metadata = (("authorization", f"Bearer {DEV_KEY}"),)

    def call(_):
        with grpc.insecure_channel(mesh.address("gateway")) as channel:
            try:
                gateway_pb2_grpc.GatewayServiceStub(channel).CreateChatCompletion(
                    request, metadata=metadata, timeout=60
                )
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    with ThreadPoolExecutor(calls) as pool:
        return list(pool.map(call, range(calls)))


def _expect(status: int, url: str, body: dict) -> None:
    answered, content = _post(url, body)
    assert answered == status, f"{url} {body}: {answered} {content[:500]!r}"


def _send_traffic(mesh, edge_url: str) -> None:
    budget = {"monthly_limit_usd": 1, "alert_percentages": [50, 80, 100], "hard_stop": False}
    answered, content = _post(f"{edge_url}/admin/v1/tenants/dev/budget", budget, key=ADMIN_KEY, method="PUT")
    assert answered == 200, content
    chat = f"{edge_url}/v1/chat/completions"
    cached = _chat(LOCAL_MODEL, "What is the capital of France?", temperature=0)
    _expect(200, chat, cached)
    _expect(200, chat, cached)  # the same request again: a cache hit (exact layer)
    # Reworded: a hit from the semantic layer (the pair tests/integration/test_semantic_cache_edge.py uses).
    _expect(200, chat, _chat(LOCAL_MODEL, "Tell me France's capital city.", temperature=0))
    _expect(200, chat, _chat(LOCAL_MODEL, "What is the capital of Spain?", temperature=0))  # evicts the first
    # A negated question near a stored one: the false-hit guards veto the candidate (a miss).
    _expect(200, chat, _chat(LOCAL_MODEL, "Which vitamins are water-soluble?", temperature=0))
    _expect(200, chat, _chat(LOCAL_MODEL, "Which vitamins are NOT water-soluble?", temperature=0))
    _expect(200, chat, _chat(BROKEN_MODEL, "Hello"))  # fails at its provider, falls back
    _expect(200, chat, _chat(LOCAL_MODEL, "Tell me a joke", stream=True))
    # Explicit models are planned from the Router's snapshot; "auto" asks the Router (a routing decision).
    # Cacheable (temperature 0), so the cache's embedding comes with it and the Router classifies the
    # prompt whatever its own embedding's time limit (the classification histogram).
    _expect(200, chat, _chat("auto", "Translate 'thank you' into German.", temperature=0))
    _expect(400, chat, _chat(LOCAL_MODEL, "Hi", max_tokens=-5))
    _expect(200, f"{edge_url}/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "hello"})
    # Admission (2 slots) and ModelInference (1 generation, no queue) refuse some of a burst; retry a
    # few bursts in case the calls happen not to overlap.
    for _ in range(5):
        codes = _burst(mesh, 6)
        if grpc.StatusCode.UNAVAILABLE in codes and _inference_refused(mesh):
            return
    pytest.fail(f"the burst was never refused by both admission and ModelInference: {codes}")


def _scrape(mesh, service: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url(mesh, service), timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _inference_refused(mesh) -> bool:
    return any(
        name == "rpc_server_duration_milliseconds_count" and ("rpc_grpc_status_code", "UNAVAILABLE") in labels
        for name, labels in _scrape(mesh, "inference")
    )


def _exported_names(mesh) -> set[str]:
    return {name for service in SERVICES for name, _ in _scrape(mesh, service)}


class Prometheus:
    """The real Prometheus (Debian's build, in the venv) with the deployment's rule files and the
    compose scrape config's jobs, pointed at this mesh's metrics ports."""

    def __init__(self, mesh, directory: Path) -> None:
        self.port = free_port()
        config = yaml.safe_load(monitoring.PROMETHEUS_CONFIGS[0].read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(path) for path in monitoring.RULES]
        base = mesh.config.telemetry.prometheus_base_port
        for job in config["scrape_configs"]:
            job["static_configs"] = [
                {"targets": [f"127.0.0.1:{base + PROMETHEUS_PORT_OFFSETS[job['job_name']]}"]}
            ]
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(directory / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_until(self, expr: str, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.query(expr)
            except OSError:
                result = []
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def _dashboard_query(expr: str) -> str:
    for variable, duration in TEST_DURATIONS.items():
        expr = expr.replace(variable, duration)
    return substitute_grafana_variables(expr)


def test_the_container_health_check_passes_against_every_live_service(mesh):
    for service in SERVICES:
        result = subprocess.run(
            [sys.executable, str(HEALTHCHECK), service],
            env=mesh.environ,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, f"{service}: {result.stderr}"


def test_the_edge_entry_point_serves_through_to_the_gateway(mesh, tmp_path):
    environ = {
        **mesh.environ,
        "SOPHIA__EDGE__PORT": str(free_port()),
        "SOPHIA__EDGE__ADMIN_PORT": str(free_port()),
        "SOPHIA_EDGE_DIR": str(tmp_path),
        "PATH": f"{REPO_ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
    }
    edge = subprocess.Popen([sys.executable, str(EDGE_ENTRY)], env=environ, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            check = subprocess.run(
                [sys.executable, str(HEALTHCHECK), "edge"], env=environ, capture_output=True
            )
            if check.returncode == 0:
                break
            assert edge.poll() is None, "the edge exited"
            assert time.monotonic() < deadline, check.stderr
            time.sleep(0.5)
        status, body = _post(
            f"http://127.0.0.1:{environ['SOPHIA__EDGE__PORT']}/v1/chat/completions", _chat(LOCAL_MODEL, "Hi")
        )
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"]
    finally:
        edge.send_signal(signal.SIGTERM)
        edge.wait(30)


def test_every_metric_used_is_exported_and_every_dashboard_query_has_data(mesh, tmp_path):
    prometheus = Prometheus(mesh, tmp_path)
    try:
        jobs = prometheus.wait_until("count(up == 1) == 5")
        assert jobs, "Prometheus does not scrape all five services"
        _send_traffic(mesh, mesh.edge_url)
        exported = _exported_names(mesh)
        uses, recorded = monitoring.metric_uses()
        missing = {
            name: sorted(where)
            for name, where in uses.items()
            if name not in exported and name not in recorded and name not in monitoring.PROMETHEUS_SYNTHETIC
        }
        assert not missing, f"used but not exported: {json.dumps(missing, indent=2)}"
        # Two scrapes and a rule evaluation after the traffic, every dashboard query answers.
        time.sleep(3)
        empty = []
        for where, expr in monitoring.dashboard_expressions():
            if not prometheus.wait_until(_dashboard_query(expr), timeout=10):
                empty.append(f"{where}: {expr}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        for name in recorded:
            assert prometheus.wait_until(name, timeout=10), f"recording rule {name} has no data"
        # Attributes a dashboard may split by: tokens per tenant, routing decisions per difficulty (the
        # traffic's auto request is classified).
        assert prometheus.wait_until('sophia_gateway_tokens_total{tenant!=""}', timeout=10)
        classified = 'sophia_router_decisions_total{difficulty=~"simple|complex"}'
        assert prometheus.wait_until(classified, timeout=10)
    finally:
        prometheus.stop()
