"""The Router as real processes over gRPC, with a real Redis, configured from files written by the test:
plans, classification, breakers shared by two replicas, probes, flags, reloads and bad input."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs.config import REPO_ROOT
from tests.support import free_port, grpcurl_security, internal_blocking_channel, mesh_environ
from tools.mesh import VENV_BIN, Mesh

pytestmark = pytest.mark.integration

CONFIG = textwrap.dedent("""\
    redis: {url: "${SOPHIA_REDIS_URL}"}
    providers:
      local: {type: local}
      openai: {type: openai, base_url: "http://127.0.0.1:1"}
      anthropic: {type: anthropic, base_url: "http://127.0.0.1:1"}
    models:
      local-small: {provider: local, context_window: 8192}
      gpt-4o: {provider: openai, provider_model: gpt-4o-2024-08-06, context_window: 128000}
      gpt-4o-mini: {provider: openai, context_window: 128000}
      claude-sonnet: {provider: anthropic, context_window: 200000}
      coder: {provider: openai, context_window: 16000}
      retired: {provider: openai, enabled: false}
      embed-local: {provider: local, kind: embedding, context_window: 256}
    ledger:
      prices:
        gpt-4o: {input_per_mtok_usd: 2.5, output_per_mtok_usd: 10}
        gpt-4o-mini: {input_per_mtok_usd: 0.15, output_per_mtok_usd: 0.6}
        claude-sonnet: {input_per_mtok_usd: 3, output_per_mtok_usd: 15}
        coder: {input_per_mtok_usd: 1, output_per_mtok_usd: 2}
    routing:
      default_chain: [local-small]
      default_embedding_model: embed-local
      preferences:
        fast: [gpt-4o-mini]
        quality: [retired, claude-sonnet, gpt-4o]
      task_types:
        code: [coder, gpt-4o]
        translation: [gpt-4o-mini]
      fallback_map:
        gpt-4o: [claude-sonnet, gpt-4o-mini]
        retired: [gpt-4o-mini]
      model_profiles:
        gpt-4o: {quality: 4, tools: true}
        gpt-4o-mini: {quality: 2, tools: true}
        claude-sonnet: {quality: 5, tools: true}
        coder: {quality: 3}
      flags_file: FLAGS_FILE
      watch_seconds: 0.2
      # The Router embeds the prompts itself here (no cache in front): give it time on a busy machine.
      classifier: {examples_file: EXAMPLES_FILE, embed_timeout_seconds: 10}
      breaker:
        {consecutive_failures: 3, min_requests: 50, cooldown_seconds: 1.5, probes: 1, refresh_seconds: 0.1}
""")
REFERENCE_EXAMPLES = REPO_ROOT / "config" / "router_examples.yaml"
FLAGS = "models:\n  claude-sonnet: {rollout_percentage: 0, tenant_overrides: {vip: 100}}\n"


def config_text(flags_path: Path, examples_path: Path = REFERENCE_EXAMPLES) -> str:
    return CONFIG.replace("FLAGS_FILE", str(flags_path)).replace("EXAMPLES_FILE", str(examples_path))


@contextlib.contextmanager
def running_routers(state_dir: Path, replicas: int = 1, examples_path: Path = REFERENCE_EXAMPLES):
    """Redis and `replicas` Routers sharing it, each on its own port; yields (stubs, config, flags)."""
    config_path, flags_path = state_dir / "sophia.yaml", state_dir / "flags.yaml"
    flags_path.write_text(FLAGS)
    config_path.write_text(config_text(flags_path, examples_path))
    environ = mesh_environ({"SOPHIA_CONFIG": str(config_path)})
    meshes = [Mesh(state_dir / "first", environ)]
    for n in range(1, replicas):
        other = {**environ, "SOPHIA__SERVICES__ROUTER__PORT": str(free_port())}
        meshes.append(Mesh(state_dir / f"replica-{n}", other))
    stack = contextlib.ExitStack()
    try:
        meshes[0].start("redis")
        meshes[0].wait_ready(["redis"], 30)
        for mesh in meshes:
            mesh.start("router")
        for mesh in meshes:
            mesh.wait_ready(["router"], timeout=120)
        channels = [stack.enter_context(internal_blocking_channel(m, "router")) for m in meshes]
        yield [router_pb2_grpc.RouterServiceStub(c) for c in channels], config_path, flags_path, meshes[0]
    finally:
        stack.close()
        for mesh in reversed(meshes):
            mesh.stop_all()


@pytest.fixture(scope="module")
def routers(tmp_path_factory):
    with running_routers(tmp_path_factory.mktemp("router"), replicas=2) as running:
        yield running


@pytest.fixture
def router(routers):
    return routers[0][0]


def route(stub, **fields) -> tuple[list[str], str]:
    fields.setdefault("tenant_id", "vip")  # in claude-sonnet's rollout
    reply = stub.Route(pb.RouteRequest(**fields), timeout=5)
    return [t.model_id for t in reply.targets], reply.reason


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def report(stub, model_id: str, provider: str, outcome, n: int = 1, latency: int = 100, **extra) -> None:
    entry = pb.OutcomeReport(
        provider=provider, model_id=model_id, outcome=outcome, latency_ms=latency, **extra
    )
    stub.ReportOutcome(pb.ReportOutcomeRequest(reports=[entry] * n), timeout=5)


def target_health(stub, model_id: str) -> pb.ProviderHealth:
    reply = stub.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5)
    (entry,) = [p for p in reply.providers if p.model_id == model_id]
    return entry


def eventually(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


# --- plans ----------------------------------------------------------------------------------------


def test_explicit_model_with_fallbacks(router):
    reply = router.Route(pb.RouteRequest(model="gpt-4o", tenant_id="vip"), timeout=5)
    assert [(t.model_id, t.provider, t.provider_model) for t in reply.targets] == [
        ("gpt-4o", "openai", "gpt-4o-2024-08-06"),
        ("claude-sonnet", "anthropic", "claude-sonnet"),
        ("gpt-4o-mini", "openai", "gpt-4o-mini"),
    ]
    assert reply.reason == "explicit model gpt-4o"
    assert reply.difficulty == pb.DIFFICULTY_UNSPECIFIED


def test_the_router_classifies_prompts_and_routes_by_task_type_and_difficulty(router):
    reply = router.Route(
        pb.RouteRequest(model="auto", prompt="Translate to German: 'The elevator is out of service today.'"),
        timeout=10,
    )
    assert reply.task_type == "translation"
    assert [t.model_id for t in reply.targets] == ["gpt-4o-mini", "local-small"]
    assert "classified task_type=translation" in reply.reason
    assert 0 < reply.confidence <= 1

    simple = router.Route(pb.RouteRequest(prompt="hey, what does KPI stand for?"), timeout=10)
    assert simple.difficulty == pb.DIFFICULTY_SIMPLE
    # The cheapest capable model first: the local model costs nothing.
    assert simple.targets[0].model_id == "local-small"
    assert "balanced: simple prompt" in simple.reason


def test_flags_keep_a_model_from_tenants_outside_its_rollout(router):
    models, _ = route(router, model_preference=pb.MODEL_PREFERENCE_QUALITY, tenant_id="acme")
    assert models == ["gpt-4o", "local-small"]
    models, reason = route(router, model_preference=pb.MODEL_PREFERENCE_QUALITY, tenant_id="vip")
    assert models == ["claude-sonnet", "gpt-4o", "local-small"]
    assert "retired (disabled)" in reason


def test_context_window_filter(router):
    assert route(router, task_type="code", estimated_tokens=20000)[0] == ["gpt-4o"]
    error = status_of(lambda: router.Route(pb.RouteRequest(model="coder", estimated_tokens=90000), timeout=5))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_embedding_routes_to_the_default_embedding_model(router):
    reply = router.Route(pb.RouteRequest(kind=pb.MODEL_KIND_EMBEDDING), timeout=5)
    assert [(t.model_id, t.provider) for t in reply.targets] == [("embed-local", "local")]


def test_unknown_model_is_not_found(router):
    error = status_of(lambda: router.Route(pb.RouteRequest(model="gpt-9"), timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("model:")


# --- bad input to every RPC -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"model": "embed-local"}, "model"),
        ({"model": "gpt-4o", "kind": pb.MODEL_KIND_EMBEDDING}, "model"),
        ({"estimated_tokens": -5}, "estimated_tokens"),
        ({"model_preference": 42}, "model_preference"),
        ({"kind": 9}, "kind"),
        ({"model": "m" * 500}, "model"),
        ({"tenant_id": "t" * 500}, "tenant_id"),
        ({"prompt": "hi", "prompt_embedding": [0.1] * 3}, "prompt_embedding"),
        ({"prompt": "hi", "prompt_embedding": [float("nan")] * 384}, "prompt_embedding"),
        ({"budget_used_fraction": -1}, "budget_used_fraction"),
    ],
)
def test_invalid_route_requests(router, request_fields, field):
    error = status_of(lambda: router.Route(pb.RouteRequest(**request_fields), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:")


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"model_id": "gpt-4o", "outcome": pb.OUTCOME_SUCCESS}, "reports[0].provider"),
        ({"provider": "openai", "outcome": pb.OUTCOME_SUCCESS}, "reports[0].model_id"),
        ({"provider": "openai", "model_id": "gpt-4o"}, "reports[0].outcome"),
        ({"provider": "openai", "model_id": "gpt-4o", "outcome": 17}, "reports[0].outcome"),
        (
            {"provider": "openai", "model_id": "gpt-4o", "outcome": 1, "latency_ms": -1},
            "reports[0].latency_ms",
        ),
        (
            {"provider": "openai", "model_id": "gpt-4o", "outcome": 1, "time_to_first_token_ms": -3},
            "reports[0].time_to_first_token_ms",
        ),
    ],
)
def test_invalid_outcome_reports(router, entry, field):
    request = pb.ReportOutcomeRequest(reports=[pb.OutcomeReport(**entry)])
    error = status_of(lambda: router.ReportOutcome(request, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:")
    error = status_of(lambda: router.ReportOutcome(pb.ReportOutcomeRequest(), timeout=5))
    assert error.details().startswith("reports:")


@pytest.mark.parametrize(
    "method", ["Route", "ReportOutcome", "GetProviderHealth", "ReloadConfig", "ListModels"]
)
def test_undecodable_requests_are_invalid_argument_on_every_rpc(routers, method):
    mesh = routers[3]
    with internal_blocking_channel(mesh, "router") as channel:
        call = channel.unary_unary(f"/sophia.router.v1.RouterService/{method}")
        error = status_of(lambda: call(b"\xff\xff\xff", timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- health and breakers --------------------------------------------------------------------------


def test_outcomes_feed_provider_health_with_latency_percentiles(router):
    for latency in (120, 80, 400, 90):
        report(router, "coder", "openai", pb.OUTCOME_SUCCESS, latency=latency, time_to_first_token_ms=30)
    report(router, "coder", "openai", pb.OUTCOME_RETRYABLE_ERROR, latency=20, error="http_503")
    entry = target_health(router, "coder")
    assert (entry.successes, entry.failures) == (4, 1)
    assert (entry.p50_latency_ms, entry.p95_latency_ms, entry.p50_time_to_first_token_ms) == (90, 400, 30)
    assert entry.error_rate == pytest.approx(0.2)
    assert entry.last_error == "http_503" and entry.last_error_time.seconds > 0
    assert entry.circuit_state == pb.CIRCUIT_STATE_CLOSED


def test_a_breaker_opened_on_one_replica_skips_the_target_on_the_other_then_probes_and_closes(routers):
    first, second = routers[0]
    assert route(second, model="gpt-4o")[0][0] == "gpt-4o"
    report(first, "gpt-4o", "openai", pb.OUTCOME_TIMEOUT, n=3, error="timeout")
    health = first.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5)
    assert health.status == pb.HEALTH_STATUS_DEGRADED
    assert {a.provider: a.availability for a in health.availability}["openai"] == pb.AVAILABILITY_DEGRADED
    (entry,) = [p for p in health.providers if p.model_id == "gpt-4o"]
    assert entry.circuit_state == pb.CIRCUIT_STATE_OPEN and entry.consecutive_failures == 3
    # The other replica sees it within a refresh and plans around it.
    models = eventually(lambda: (m := route(second, model="gpt-4o"))[0][0] != "gpt-4o" and m)
    assert models and models[0] == ["claude-sonnet", "gpt-4o-mini"]
    assert "circuit open: skipped gpt-4o" in models[1]
    # After the cool-down exactly one request (on either replica) gets the probe.
    time.sleep(1.6)
    plans = [route(stub, model="gpt-4o")[0] for stub in (second, first, second)]
    assert [p[0] == "gpt-4o" for p in plans] == [True, False, False]
    assert target_health(first, "gpt-4o").circuit_state == pb.CIRCUIT_STATE_HALF_OPEN
    report(second, "gpt-4o", "openai", pb.OUTCOME_SUCCESS)
    assert target_health(first, "gpt-4o").circuit_state == pb.CIRCUIT_STATE_CLOSED
    assert eventually(lambda: route(first, model="gpt-4o")[0][0] == "gpt-4o")
    assert (
        first.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5).status == pb.HEALTH_STATUS_HEALTHY
    )


def test_a_failed_probe_opens_the_breaker_again(routers):
    first, _ = routers[0]
    report(first, "gpt-4o-mini", "openai", pb.OUTCOME_RETRYABLE_ERROR, n=3, error="http_500")
    time.sleep(1.6)
    assert route(first, model="gpt-4o-mini")[0] == ["gpt-4o-mini"]  # the probe
    report(first, "gpt-4o-mini", "openai", pb.OUTCOME_RETRYABLE_ERROR, error="http_500")
    assert target_health(first, "gpt-4o-mini").circuit_state == pb.CIRCUIT_STATE_OPEN
    # Nothing else in its plan: an open target is kept rather than an empty plan, and said so.
    models, reason = route(first, model="gpt-4o-mini")
    assert models == ["gpt-4o-mini"] and "nothing else can serve" in reason
    time.sleep(1.6)
    route(first, model="gpt-4o-mini")
    report(first, "gpt-4o-mini", "openai", pb.OUTCOME_SUCCESS)
    assert target_health(first, "gpt-4o-mini").circuit_state == pb.CIRCUIT_STATE_CLOSED


def test_rejected_requests_do_not_count_against_a_target(router):
    report(router, "claude-sonnet", "anthropic", pb.OUTCOME_FATAL_ERROR, n=5, error="http_400")
    entry = target_health(router, "claude-sonnet")
    assert entry.circuit_state == pb.CIRCUIT_STATE_CLOSED and entry.failures == 0


def test_a_probe_answered_with_a_rejection_is_handed_to_the_next_request(routers):
    """The request that held the probe was refused as bad (a 400, a prompt too long for the model): that
    says nothing of the target, so the next request probes it, on either replica, without waiting for
    another cool-down."""
    first, second = routers[0]
    report(first, "claude-sonnet", "anthropic", pb.OUTCOME_TIMEOUT, n=3, error="timeout")
    assert eventually(lambda: "circuit open" in route(second, model="claude-sonnet")[1])
    time.sleep(1.6)
    assert "probing claude-sonnet" in route(first, model="claude-sonnet")[1]
    assert "nothing else can serve" in route(second, model="claude-sonnet")[1]  # the probe is out
    report(first, "claude-sonnet", "anthropic", pb.OUTCOME_FATAL_ERROR, error="http_400")
    assert "probing claude-sonnet" in route(second, model="claude-sonnet")[1]
    report(second, "claude-sonnet", "anthropic", pb.OUTCOME_RETRYABLE_ERROR, error="context_window")
    assert "probing claude-sonnet" in route(first, model="claude-sonnet")[1]
    report(second, "claude-sonnet", "anthropic", pb.OUTCOME_SUCCESS)
    assert target_health(first, "claude-sonnet").circuit_state == pb.CIRCUIT_STATE_CLOSED


def test_reports_on_targets_not_configured_are_refused_and_the_others_recorded(routers):
    first, _ = routers[0]
    before = target_health(first, "claude-sonnet").successes
    good = pb.OutcomeReport(provider="anthropic", model_id="claude-sonnet", outcome=pb.OUTCOME_SUCCESS)
    bogus = pb.OutcomeReport(provider="evil", model_id="m-0", outcome=pb.OUTCOME_RETRYABLE_ERROR)
    error = status_of(lambda: first.ReportOutcome(pb.ReportOutcomeRequest(reports=[good, bogus]), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("reports[1].model_id: 'm-0' is not a configured model")
    assert target_health(first, "claude-sonnet").successes == before + 1
    # Invented targets never fill the tracked set: none is tracked, the configured ones still are.
    for batch in range(5):
        reports = [
            pb.OutcomeReport(provider="evil", model_id=f"m{batch}-{n}", outcome=2) for n in range(1000)
        ]
        error = status_of(
            lambda reports=reports: first.ReportOutcome(pb.ReportOutcomeRequest(reports=reports), timeout=30)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = first.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5)
    assert not [p for p in reply.providers if p.provider == "evil"]
    report(first, "claude-sonnet", "anthropic", pb.OUTCOME_SUCCESS)


def test_a_huge_embedding_gives_a_finite_confidence(router):
    prompt = "write a python function that sorts a list"
    for value in (3e38, 1e-45, 0.0):
        reply = router.Route(pb.RouteRequest(prompt=prompt, prompt_embedding=[value] * 384), timeout=10)
        assert math.isfinite(reply.confidence) and 0 <= reply.confidence <= 1


def test_provider_health_through_grpcurl(routers):
    mesh = routers[3]
    output = subprocess.run(
        [
            str(VENV_BIN / "grpcurl"),
            *grpcurl_security(mesh, "router"),
            "-d",
            "{}",
            mesh.address("router"),
            "sophia.router.v1.RouterService/GetProviderHealth",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    reply = json.loads(output)
    assert reply["status"] in {"HEALTH_STATUS_HEALTHY", "HEALTH_STATUS_DEGRADED"}
    assert {p["provider"] for p in reply["availability"]} == {"local", "openai", "anthropic"}
    local = [p for p in reply["providers"] if p.get("modelId", p.get("model_id")) == "local-small"]
    assert [p["provider"] for p in local] == ["local"], output


# --- reloads --------------------------------------------------------------------------------------


def test_flag_and_config_files_are_watched_and_a_bad_file_is_refused(routers):
    (first, _), config_path, flags_path = routers[0], routers[1], routers[2]
    try:
        flags_path.write_text("models:\n  claude-sonnet: {rollout_percentage: 100}\n")
        assert eventually(
            lambda: (
                route(first, model_preference=pb.MODEL_PREFERENCE_QUALITY, tenant_id="acme")[0][0]
                == "claude-sonnet"
            )
        )
        flags_path.write_text("models:\n  claude-sonnet: {rollout_percentage: 250}\n")
        error = status_of(lambda: first.ReloadConfig(pb.ReloadConfigRequest(), timeout=30))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "models.claude-sonnet.rollout_percentage" in error.details()
        # The flags in force stay.
        assert (
            route(first, model_preference=pb.MODEL_PREFERENCE_QUALITY, tenant_id="acme")[0][0]
            == "claude-sonnet"
        )

        configured = config_path.read_text()
        assert "    translation: [gpt-4o-mini]\n" in configured
        config_path.write_text(configured.replace("default_chain: [local-small]", "default_chain: [gpt-5]"))
        error = status_of(lambda: first.ReloadConfig(pb.ReloadConfigRequest(), timeout=30))
        assert "routing.default_chain: unknown model 'gpt-5'" in error.details()
        assert route(first, model="auto")[0][-1] == "local-small"
    finally:
        config_path.write_text(config_text(flags_path))
        flags_path.write_text(FLAGS)
    reply = first.ReloadConfig(pb.ReloadConfigRequest(), timeout=30)
    assert (reply.models, reply.model_flags) == (7, 1)
    assert reply.task_types >= 10


def test_list_models(router):
    models = {m.model_id: m for m in router.ListModels(pb.ListModelsRequest(), timeout=5).models}
    assert len(models) == 7
    assert (models["retired"].provider, models["retired"].enabled) == ("openai", False)


def test_open_targets_of_an_automatic_plan_give_way_to_the_default_chain(routers):
    # Runs last on the shared Routers: it leaves two breakers open.
    first = routers[0][0]
    report(first, "coder", "openai", pb.OUTCOME_RETRYABLE_ERROR, n=3, error="http_502")
    models, reason = route(first, task_type="code")
    assert models == ["gpt-4o", "local-small"] and "circuit open: skipped coder" in reason
    report(first, "gpt-4o", "openai", pb.OUTCOME_RETRYABLE_ERROR, n=3, error="http_502")
    models, reason = route(first, task_type="code")
    # Not [coder, gpt-4o, local-small]: the open ones are not tried first while the default can serve.
    assert models == ["local-small"] and "circuit open: skipped coder, gpt-4o" in reason


def test_with_redis_down_routing_goes_on_on_the_last_known_breakers(tmp_path):
    with running_routers(tmp_path) as (stubs, _, _, mesh):
        (stub,) = stubs
        report(stub, "gpt-4o", "openai", pb.OUTCOME_TIMEOUT, n=3, error="timeout")
        mesh.stop("redis")
        models, _ = route(stub, model="gpt-4o")
        assert models == ["claude-sonnet", "gpt-4o-mini"]
        health = stub.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5)
        assert health.status == pb.HEALTH_STATUS_DEGRADED
        (entry,) = [p for p in health.providers if p.model_id == "gpt-4o"]
        assert entry.circuit_state == pb.CIRCUIT_STATE_OPEN
        error = status_of(lambda: report(stub, "gpt-4o", "openai", pb.OUTCOME_SUCCESS))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "health store unavailable" in error.details()


def test_the_reason_is_ascii_for_the_gateways_header(router):
    _, reason = route(router, task_type="poésie", prompt="bonjour")
    assert reason.isascii() and "po\\xe9sie" in reason


LEGAL_REVIEW = """
  legal_review:
    cues: ['\\bclause\\b', '\\bindemnif', '\\bliabilit']
    examples:
      - {difficulty: simple, text: "Is this NDA clause one-sided? 'The Recipient keeps it all secret.'"}
      - {difficulty: complex, text: "Review this liability cap clause: what risks does it leave us?"}
      - {difficulty: simple, text: "Does a non-compete clause like this hold up for a junior employee?"}
      - {difficulty: complex, text: "Mark up this indemnification section: mutual, capped at fees paid."}
      - {difficulty: complex, text: "Which of these contract terms should counsel push back on?"}
"""


def test_an_operator_adds_a_task_type_with_examples_and_a_rule_without_a_restart(tmp_path):
    examples = tmp_path / "examples.yaml"
    shutil.copy(REFERENCE_EXAMPLES, examples)
    shutil.copy(REFERENCE_EXAMPLES.with_suffix(".npz"), examples.with_suffix(".npz"))
    prompt = "Can you check whether the termination clause in this vendor agreement favours them?"
    (tmp_path / "mesh").mkdir()
    with running_routers(tmp_path / "mesh", examples_path=examples) as (stubs, config_path, _, _):
        (stub,) = stubs
        assert stub.Route(pb.RouteRequest(prompt=prompt), timeout=30).task_type != "legal_review"
        examples.write_text(examples.read_text().rstrip() + "\n" + LEGAL_REVIEW)
        configured = config_path.read_text()
        assert "    translation: [gpt-4o-mini]\n" in configured
        config_path.write_text(
            configured.replace(
                "    translation: [gpt-4o-mini]\n",
                "    translation: [gpt-4o-mini]\n    legal_review: [claude-sonnet]\n",
            )
        )
        # Both files are watched: no ReloadConfig, no restart.
        deadline = time.monotonic() + 60
        while True:
            reply = stub.Route(pb.RouteRequest(prompt=prompt, tenant_id="vip"), timeout=30)
            # Both the examples and the rule are in.
            if "classified task_type=legal_review" in reply.reason or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "classified task_type=legal_review" in reply.reason, reply.reason
        assert [t.model_id for t in reply.targets] == ["claude-sonnet", "local-small"]
        assert reply.task_type == "legal_review"


def test_a_router_started_before_redis_serves_and_takes_reports_once_redis_answers(tmp_path):
    config_path, flags_path = tmp_path / "sophia.yaml", tmp_path / "flags.yaml"
    flags_path.write_text(FLAGS)
    config_path.write_text(config_text(flags_path))
    mesh = Mesh(tmp_path / "mesh", mesh_environ({"SOPHIA_CONFIG": str(config_path)}))
    try:
        mesh.start("router")
        mesh.wait_ready(["router"], timeout=120)
        with internal_blocking_channel(mesh, "router") as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            assert route(stub, model="gpt-4o")[0][0] == "gpt-4o"
            health = stub.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5)
            assert health.status == pb.HEALTH_STATUS_DEGRADED
            error = status_of(lambda: report(stub, "gpt-4o", "openai", pb.OUTCOME_SUCCESS))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            mesh.start("redis")
            mesh.wait_ready(["redis"], 30)
            assert eventually(
                lambda: (
                    stub.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5).status
                    == pb.HEALTH_STATUS_HEALTHY
                )
            )
            report(stub, "gpt-4o", "openai", pb.OUTCOME_SUCCESS)
            assert target_health(stub, "gpt-4o").successes == 1
    finally:
        mesh.stop_all()
