"""A provider's breaker trips through the real mesh: the Gateway reports each attempt (batched) to the
Router, which opens the failing target's breaker in Redis; the next requests go straight to the
fallback; after the cool-down one probe goes through and, once the provider recovers, it closes.

Redis, the Router, the cache, the ledger, the Gateway and the edge run as processes; the providers
are fake HTTP servers in this process so the test can make one fail and recover."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs.config import REPO_ROOT
from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tests.fakes.provider import FakeProvider
from tests.support import free_port_block, internal_blocking_channel, mesh_environ
from tools.mesh import Mesh

pytestmark = pytest.mark.integration

KEY = "sk-breaker-test-key-01"
PROVIDER_KEY = "sk-fake-provider-key-01"
COOLDOWN_SECONDS = 2.0


def _config(flaky: FakeProvider, good: FakeProvider) -> dict:
    base = yaml.safe_load((REPO_ROOT / "config" / "sophia.yaml").read_text())

    def provider(fake: FakeProvider) -> dict:
        return {"type": "openai", "base_url": fake.openai_base_url, "api_key_env": "BREAKER_PROVIDER_KEY"}

    return {
        **{k: base[k] for k in ("inference", "redis")},
        "auth": {"tenants": {"dev": {"api_keys": [{"name": "dev", "key": KEY}]}}},
        "providers": {"local": {"type": "local"}, "flaky": provider(flaky), "good": provider(good)},
        "models": {
            "flaky-gpt": {"provider": "flaky", "provider_model": "fake-gpt"},
            "good-gpt": {"provider": "good", "provider_model": "fake-gpt"},
            "all-minilm-l6-v2": {"provider": "local", "kind": "embedding", "dimensions": 384},
        },
        "routing": {
            "default_chain": ["good-gpt"],
            "default_embedding_model": "all-minilm-l6-v2",
            "fallback_map": {"flaky-gpt": ["good-gpt"]},
            "breaker": {
                "consecutive_failures": 3,
                "cooldown_seconds": COOLDOWN_SECONDS,
                "probes": 1,
                "refresh_seconds": 0.1,
            },
        },
    }


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    state = tmp_path_factory.mktemp("breaker")
    flaky = FakeProvider(fault="status:500", api_key=PROVIDER_KEY).start()
    good = FakeProvider(api_key=PROVIDER_KEY).start()
    config_path = state / "sophia.yaml"
    config_path.write_text(yaml.safe_dump(_config(flaky, good)))
    environ = mesh_environ({"SOPHIA_CONFIG": str(config_path), "BREAKER_PROVIDER_KEY": PROVIDER_KEY})
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = str(free_port_block(5))
    running = Mesh(state, environ)
    components = ("redis", "router", "cache", "ledger", "gateway", "envoy")
    try:
        for component in components:
            running.start(component)
        running.wait_ready(list(components), 120)
        yield running, flaky, good
    finally:
        running.stop_all()
        flaky.stop()
        good.stop()


def chat(mesh: Mesh, model: str = "flaky-gpt") -> httpx.Response:
    reply = httpx.post(
        f"{mesh.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": model, "cache": False, "messages": [{"role": "user", "content": "Say hi"}]},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply


def circuit(mesh: Mesh, model_id: str) -> int:
    with internal_blocking_channel(mesh, "router") as channel:
        reply = router_pb2_grpc.RouterServiceStub(channel).GetProviderHealth(
            pb.GetProviderHealthRequest(), timeout=5
        )
    return next(p for p in reply.providers if p.model_id == model_id).circuit_state


def eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def router_metric(mesh: Mesh, name: str, **labels: str) -> float | None:
    """The value of the Router's Prometheus series `name` whose labels include `labels`."""
    port = mesh.config.telemetry.prometheus_base_port + PROMETHEUS_PORT_OFFSETS["router"]
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in wanted):
            return float(line.rsplit(" ", 1)[1])
    return None


def calls(fake: FakeProvider) -> int:
    return len(fake.recorded("/v1/chat/completions"))


def health(mesh: Mesh) -> dict:
    """GET /health through the edge, with no key."""
    reply = httpx.get(f"{mesh.edge_url}/health", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_failing_provider_trips_its_breaker_then_a_probe_closes_it_when_it_recovers(mesh):
    mesh, flaky, _ = mesh
    before = health(mesh)
    assert before["status"] == "healthy" and before["providers"]["flaky"] == "available", before
    assert before["version"] and not {"key", "secret", "base_url"} & set(before)
    for _ in range(3):
        reply = chat(mesh)
        assert (reply.headers["x-sophia-provider"], reply.headers["x-sophia-attempts"]) == ("good", "2")
    assert eventually(lambda: circuit(mesh, "flaky-gpt") == pb.CIRCUIT_STATE_OPEN)
    assert calls(flaky) == 3
    # 2 = open, on the Router's Prometheus endpoint.
    state = {"name": "sophia_router_circuit_state", "provider": "flaky", "model": "flaky-gpt"}
    assert eventually(lambda: router_metric(mesh, **state) == 2.0)
    # /health turns degraded, naming the provider (its answer is at most a second old).
    assert eventually(lambda: health(mesh)["status"] == "degraded")
    assert health(mesh)["providers"]["flaky"] != "available"
    assert health(mesh)["providers"]["good"] == "available"

    # Open: the fallback answers at once, the failing provider is not tried first.
    for _ in range(3):
        reply = chat(mesh)
        assert (reply.headers["x-sophia-provider"], reply.headers["x-sophia-attempts"]) == ("good", "1")
    assert calls(flaky) == 3

    # The provider recovers; after the cool-down one probe reaches it and closes the breaker.
    flaky.fault = ""
    time.sleep(COOLDOWN_SECONDS + 0.2)
    reply = chat(mesh)
    assert (reply.headers["x-sophia-provider"], reply.headers["x-sophia-attempts"]) == ("flaky", "1")
    assert calls(flaky) == 4
    assert eventually(lambda: circuit(mesh, "flaky-gpt") == pb.CIRCUIT_STATE_CLOSED)
    assert eventually(lambda: chat(mesh).headers["x-sophia-provider"] == "flaky")
    assert eventually(lambda: router_metric(mesh, **state) == 0.0)
    # While a circuit was open or half-open (three requests, then the probe) the Router planned the
    # requests; once the Gateway's WatchRoutes snapshot shows every target closed, it plans requests for
    # an explicit model itself, without a Route call.
    decisions = {"name": "sophia_router_decisions_total", "decision": "explicit_model"}
    assert router_metric(mesh, **decisions) >= 4

    def planned_by_the_gateway() -> bool:
        routed = router_metric(mesh, **decisions)
        return (
            chat(mesh).headers["x-sophia-provider"] == "flaky" and router_metric(mesh, **decisions) == routed
        )

    assert eventually(planned_by_the_gateway)  # the snapshot saying "closed" may take a moment to arrive
    routed = router_metric(mesh, **decisions)
    for _ in range(5):
        assert chat(mesh).headers["x-sophia-provider"] == "flaky"
    assert router_metric(mesh, **decisions) == routed


def test_a_failed_probe_keeps_the_fallback_in_front(mesh):
    mesh, flaky, _ = mesh
    flaky.fault = "status:503"
    try:
        # Requests keep coming until the failures open the breaker again.
        assert eventually(lambda: chat(mesh) and circuit(mesh, "flaky-gpt") == pb.CIRCUIT_STATE_OPEN)
        before = calls(flaky)
        time.sleep(COOLDOWN_SECONDS + 0.2)
        assert chat(mesh).headers["x-sophia-attempts"] == "2"  # the probe failed, the fallback answered
        assert calls(flaky) == before + 1
        assert eventually(lambda: circuit(mesh, "flaky-gpt") == pb.CIRCUIT_STATE_OPEN)
        assert chat(mesh).headers["x-sophia-attempts"] == "1"
        assert calls(flaky) == before + 1
    finally:
        flaky.fault = ""


def target_health(mesh: Mesh, model_id: str) -> pb.ProviderHealth:
    with internal_blocking_channel(mesh, "router") as channel:
        reply = router_pb2_grpc.RouterServiceStub(channel).GetProviderHealth(
            pb.GetProviderHealthRequest(), timeout=5
        )
    return next(p for p in reply.providers if p.model_id == model_id)


def settled_health(mesh: Mesh, model_id: str, quiet_seconds: float = 0.5) -> pb.ProviderHealth:
    """The target's health once its counters have not changed for `quiet_seconds` (outcomes are
    reported after the answer, in batches, so a request just answered may not be counted yet)."""
    health = target_health(mesh, model_id)
    while True:
        time.sleep(quiet_seconds)
        again = target_health(mesh, model_id)
        if (again.successes, again.failures) == (health.successes, health.failures):
            return again
        health = again


def stream(mesh: Mesh, model: str) -> list[str]:
    """The SSE data lines of a streamed answer, read to the end (or to where the stream broke)."""
    lines = []
    with httpx.stream(
        "POST",
        f"{mesh.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": model,
            "stream": True,
            "cache": False,
            "messages": [{"role": "user", "content": "one two three four five six"}],
        },
        timeout=30,
    ) as reply:
        assert reply.status_code == 200
        try:
            lines = [line for line in reply.iter_lines() if line.startswith("data:")]
        except httpx.HTTPError:
            pass
    return lines


def test_a_stream_is_reported_when_it_ends_with_its_time_to_first_token(mesh):
    mesh, _, good = mesh
    before = settled_health(mesh, "good-gpt")  # the fallback answered the test above's requests
    good.latency = 0.05
    try:
        lines = stream(mesh, "good-gpt")
    finally:
        good.latency = 0.0
    assert lines[-1] == "data: [DONE]"
    assert eventually(lambda: target_health(mesh, "good-gpt").successes == before.successes + 1)
    assert target_health(mesh, "good-gpt").p50_time_to_first_token_ms >= 50


def test_a_stream_that_breaks_after_its_first_token_counts_as_a_failure(mesh):
    mesh, flaky, _ = mesh
    # Requests (probes after the cool-down) until the breaker left open by the test above closes.
    assert eventually(lambda: chat(mesh) and circuit(mesh, "flaky-gpt") == pb.CIRCUIT_STATE_CLOSED, 20)
    # The last of those requests may have been answered after the breaker closed, its outcome still on
    # its way to the Router: count from counters that have stopped moving.
    before = settled_health(mesh, "flaky-gpt")
    flaky.fault = "drop_midstream"
    try:
        stream(mesh, "flaky-gpt")
    finally:
        flaky.fault = ""
    # Reported at the stream's real end, not as a success at its first token.
    assert eventually(lambda: target_health(mesh, "flaky-gpt").failures == before.failures + 1)
    after = target_health(mesh, "flaky-gpt")
    assert after.successes == before.successes
    assert after.last_error and after.consecutive_failures == 1
