"""The Router as a real process over gRPC, configured from a YAML file written by the test."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import grpc
import pytest
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from tests.support import internal_blocking_channel, mesh_environ
from tools.mesh import Mesh

pytestmark = pytest.mark.integration

CONFIG = textwrap.dedent("""\
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
    routing:
      default_chain: [local-small]
      default_embedding_model: embed-local
      preferences:
        fast: [gpt-4o-mini]
        quality: [retired, claude-sonnet, gpt-4o]
      task_types:
        code: [coder, gpt-4o]
      fallback_map:
        gpt-4o: [claude-sonnet, gpt-4o-mini]
        retired: [gpt-4o-mini]
""")


@contextlib.contextmanager
def running_router(state_dir: Path, config_text: str):
    config_path = state_dir / "sophia.yaml"
    config_path.write_text(config_text)
    mesh = Mesh(state_dir, mesh_environ({"SOPHIA_CONFIG": str(config_path)}))
    try:
        mesh.start("router")
        mesh.wait_ready(["router"], timeout=60)
        with internal_blocking_channel(mesh, "router") as channel:
            yield router_pb2_grpc.RouterServiceStub(channel), config_path
    finally:
        mesh.stop_all()


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    with running_router(tmp_path_factory.mktemp("router"), CONFIG) as (stub, _):
        yield stub


def route(stub, **fields) -> tuple[list[str], str]:
    reply = stub.Route(pb.RouteRequest(**fields), timeout=5)
    return [t.model_id for t in reply.targets], reply.reason


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_explicit_model_with_fallbacks(router):
    reply = router.Route(pb.RouteRequest(model="gpt-4o"), timeout=5)
    assert [(t.model_id, t.provider, t.provider_model) for t in reply.targets] == [
        ("gpt-4o", "openai", "gpt-4o-2024-08-06"),
        ("claude-sonnet", "anthropic", "claude-sonnet"),
        ("gpt-4o-mini", "openai", "gpt-4o-mini"),
    ]
    assert reply.reason == "explicit model gpt-4o"


def test_auto_is_the_default_chain(router):
    assert route(router, model="auto") == (["local-small"], "default chain")


def test_preference(router):
    assert route(router, model_preference=pb.MODEL_PREFERENCE_FAST) == (
        ["gpt-4o-mini", "local-small"],
        "model_preference=fast",
    )


def test_task_type_and_unknown_task_type(router):
    assert route(router, task_type="code") == (["coder", "gpt-4o", "local-small"], "task_type=code")
    models, reason = route(router, task_type="poetry", model_preference=pb.MODEL_PREFERENCE_FAST)
    assert models == ["gpt-4o-mini", "local-small"]
    assert "task_type 'poetry' has no rule" in reason


def test_disabled_models_are_skipped(router):
    models, reason = route(router, model_preference=pb.MODEL_PREFERENCE_QUALITY)
    assert models == ["claude-sonnet", "gpt-4o", "local-small"]
    assert "retired (disabled)" in reason
    assert route(router, model="retired")[0] == ["gpt-4o-mini"]


def test_context_window_filter(router):
    assert route(router, task_type="code", estimated_tokens=20000)[0] == ["gpt-4o"]
    error = status_of(lambda: router.Route(pb.RouteRequest(estimated_tokens=9000), timeout=5))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no enabled model with a context window of at least 9000 tokens" in error.details()


def test_embedding_routes_to_the_default_embedding_model(router):
    reply = router.Route(pb.RouteRequest(kind=pb.MODEL_KIND_EMBEDDING), timeout=5)
    assert [(t.model_id, t.provider) for t in reply.targets] == [("embed-local", "local")]


def test_unknown_model_is_not_found(router):
    error = status_of(lambda: router.Route(pb.RouteRequest(model="gpt-9"), timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("model:")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"model": "embed-local"}, "model"),
        ({"model": "gpt-4o", "kind": pb.MODEL_KIND_EMBEDDING}, "model"),
        ({"estimated_tokens": -5}, "estimated_tokens"),
        ({"model_preference": 42}, "model_preference"),
        ({"kind": 9}, "kind"),
        ({"model": "m" * 500}, "model"),
    ],
)
def test_invalid_route_requests(router, request_fields, field):
    error = status_of(lambda: router.Route(pb.RouteRequest(**request_fields), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:")


def test_outcomes_feed_provider_health(router):
    for outcome, latency in [
        (pb.OUTCOME_SUCCESS, 120),
        (pb.OUTCOME_SUCCESS, 80),
        (pb.OUTCOME_SUCCESS, 400),
        (pb.OUTCOME_TIMEOUT, 30000),
    ]:
        router.ReportOutcome(
            pb.ReportOutcomeRequest(
                provider="anthropic", model_id="claude-sonnet", outcome=outcome, latency_ms=latency
            ),
            timeout=5,
        )
    health = router.GetProviderHealth(pb.GetProviderHealthRequest(), timeout=5)
    (entry,) = [p for p in health.providers if (p.provider, p.model_id) == ("anthropic", "claude-sonnet")]
    assert (entry.successes, entry.failures, entry.p50_latency_ms) == (3, 1, 120)
    assert entry.error_rate == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"model_id": "gpt-4o", "outcome": pb.OUTCOME_SUCCESS}, "provider"),
        ({"provider": "openai", "outcome": pb.OUTCOME_SUCCESS}, "model_id"),
        ({"provider": "openai", "model_id": "gpt-4o"}, "outcome"),
        ({"provider": "openai", "model_id": "gpt-4o", "outcome": 17}, "outcome"),
        (
            {"provider": "openai", "model_id": "gpt-4o", "outcome": pb.OUTCOME_SUCCESS, "latency_ms": -1},
            "latency_ms",
        ),
    ],
)
def test_invalid_outcome_reports(router, request_fields, field):
    error = status_of(lambda: router.ReportOutcome(pb.ReportOutcomeRequest(**request_fields), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:")


def test_list_models(router):
    models = {m.model_id: m for m in router.ListModels(pb.ListModelsRequest(), timeout=5).models}
    assert len(models) == 7
    assert (models["retired"].provider, models["retired"].enabled) == ("openai", False)
    assert (models["embed-local"].kind, models["embed-local"].context_window) == (
        pb.MODEL_KIND_EMBEDDING,
        256,
    )
    assert (models["gpt-4o"].kind, models["gpt-4o"].enabled) == (pb.MODEL_KIND_CHAT, True)


def test_reload_picks_up_a_changed_file_and_refuses_a_broken_one(tmp_path):
    with running_router(tmp_path, CONFIG) as (stub, config_path):
        assert route(stub)[0] == ["local-small"]

        changed = CONFIG.replace("default_chain: [local-small]", "default_chain: [gpt-4o-mini, local-small]")
        changed = changed.replace(
            "  coder: {provider: openai", "  extra: {provider: local}\n  coder: {provider: openai"
        )
        config_path.write_text(changed)
        assert stub.ReloadConfig(pb.ReloadConfigRequest(), timeout=10).models == 8
        assert route(stub)[0] == ["gpt-4o-mini", "local-small"]
        assert "extra" in {m.model_id for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models}

        config_path.write_text(changed.replace("default_chain: [gpt-4o-mini", "default_chain: [gpt-5"))
        error = status_of(lambda: stub.ReloadConfig(pb.ReloadConfigRequest(), timeout=10))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "routing.default_chain: unknown model 'gpt-5'" in error.details()
        # The rules loaded before the broken file still answer.
        assert route(stub)[0] == ["gpt-4o-mini", "local-small"]
        assert len(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) == 8
