"""The static rules (libs/routing_rules.py) the Gateway routes by when the Router is down, and the Router
uses for explicit models and embeddings."""

from __future__ import annotations

from typing import Any

import pytest

from libs.config import Config
from libs.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.routing_rules import RouteQuery, RouteTarget, RoutingRules

MODELS: dict[str, dict[str, Any]] = {
    "local-small": {"provider": "local", "context_window": 8192},
    "gpt-4o": {"provider": "openai", "provider_model": "gpt-4o-2024-08-06", "context_window": 128000},
    "gpt-4o-mini": {"provider": "openai", "context_window": 128000},
    "claude-sonnet": {"provider": "anthropic", "context_window": 200000},
    "coder": {"provider": "openai", "context_window": 16000},
    "tiny": {"provider": "local", "context_window": 2048},
    "old": {"provider": "openai", "enabled": False},
    "embed-local": {"provider": "local", "kind": "embedding", "context_window": 256},
    "embed-remote": {"provider": "openai", "kind": "embedding", "context_window": 8191},
}


def make_rules(models: dict[str, dict[str, Any]] | None = None, **routing: Any) -> RoutingRules:
    config = Config.model_validate(
        {
            "providers": {
                "local": {"type": "local"},
                "openai": {"type": "openai", "base_url": "http://127.0.0.1:1"},
                "anthropic": {"type": "anthropic", "base_url": "http://127.0.0.1:1"},
            },
            "models": MODELS if models is None else models,
            "routing": {
                "default_chain": ["local-small"],
                "default_embedding_model": "embed-local",
                **routing,
            },
        }
    )
    return RoutingRules(config)


def chain(rules: RoutingRules, **query: Any) -> list[str]:
    return [target.model_id for target in rules.route(RouteQuery(**query)).targets]


# --- explicit models -------------------------------------------------------------------------------


def test_explicit_model_comes_with_its_provider_and_provider_model():
    plan = make_rules().route(RouteQuery(model="gpt-4o"))
    assert plan.targets == (RouteTarget("gpt-4o", "openai", "gpt-4o-2024-08-06"),)
    assert plan.reason == "explicit model gpt-4o"


def test_provider_model_defaults_to_the_model_id():
    (target,) = make_rules().route(RouteQuery(model="gpt-4o-mini")).targets
    assert target.provider_model == "gpt-4o-mini"


def test_explicit_model_is_followed_by_its_fallbacks_deduplicated_in_order():
    rules = make_rules(fallback_map={"gpt-4o": ["claude-sonnet", "gpt-4o", "gpt-4o-mini", "claude-sonnet"]})
    assert chain(rules, model="gpt-4o") == ["gpt-4o", "claude-sonnet", "gpt-4o-mini"]


def test_explicit_model_does_not_get_the_default_chain_appended():
    rules = make_rules(fallback_map={"gpt-4o": ["gpt-4o-mini"]})
    assert "local-small" not in chain(rules, model="gpt-4o")


def test_unknown_model_is_not_found_naming_the_field():
    with pytest.raises(NotFound, match=r"^model: unknown model 'nope'"):
        make_rules().route(RouteQuery(model="nope"))


def test_embedding_model_asked_for_chat_is_invalid():
    with pytest.raises(InvalidArgument) as caught:
        make_rules().route(RouteQuery(model="embed-local"))
    assert caught.value.field == "model"
    assert "embedding model" in caught.value.message


def test_chat_model_asked_for_embeddings_is_invalid():
    with pytest.raises(InvalidArgument) as caught:
        make_rules().route(RouteQuery(model="gpt-4o", kind="embedding"))
    assert caught.value.field == "model"


# --- embeddings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["", "auto"])
def test_embedding_without_a_model_gets_the_default_embedding_model(model):
    plan = make_rules().route(RouteQuery(model=model, kind="embedding"))
    assert plan.targets == (RouteTarget("embed-local", "local", "embed-local"),)
    assert plan.reason == "default embedding model embed-local"


def test_embedding_with_an_explicit_model_gets_it():
    plan = make_rules().route(RouteQuery(model="embed-remote", kind="embedding"))
    assert [t.model_id for t in plan.targets] == ["embed-remote"]
    assert plan.reason == "explicit model embed-remote"


def test_auto_is_the_default_chain_whatever_the_other_rules():
    rules = make_rules(task_types={"code": ["coder"]}, preferences={"fast": ["gpt-4o-mini"]})
    plan = rules.route(RouteQuery(model="auto"))
    assert [t.model_id for t in plan.targets] == ["local-small"]
    assert plan.reason == "default chain"


# --- filters ---------------------------------------------------------------------------------------


def test_disabled_models_are_skipped_and_named_in_the_reason():
    rules = make_rules(default_chain=["old", "gpt-4o-mini"])
    plan = rules.route(RouteQuery())
    assert [t.model_id for t in plan.targets] == ["gpt-4o-mini"]
    assert plan.reason == "default chain; skipped old (disabled)"


def test_disabled_explicit_model_leaves_its_fallbacks():
    rules = make_rules(fallback_map={"old": ["gpt-4o"]})
    assert chain(rules, model="old") == ["gpt-4o"]


def test_models_with_too_small_a_context_window_are_skipped():
    rules = make_rules(default_chain=["tiny", "local-small", "gpt-4o"])
    plan = rules.route(RouteQuery(estimated_tokens=5000))
    assert [t.model_id for t in plan.targets] == ["local-small", "gpt-4o"]
    assert "tiny (context window 2048 < 5000 tokens)" in plan.reason


def test_a_context_window_equal_to_the_estimate_is_enough():
    assert chain(make_rules(default_chain=["tiny"]), estimated_tokens=2048) == ["tiny"]


def test_zero_estimated_tokens_filters_nothing():
    assert chain(make_rules(default_chain=["tiny"]), estimated_tokens=0) == ["tiny"]


def test_nothing_left_after_the_context_filter_is_a_failed_precondition():
    rules = make_rules(default_chain=["tiny", "local-small"])
    with pytest.raises(
        FailedPrecondition, match="no enabled model with a context window of at least 9000 tokens"
    ):
        rules.route(RouteQuery(estimated_tokens=9000))


def test_only_disabled_models_is_a_failed_precondition_naming_them():
    with pytest.raises(FailedPrecondition, match=r"no enabled model .*old \(disabled\)"):
        make_rules().route(RouteQuery(model="old"))


def test_disabled_default_embedding_model_is_a_failed_precondition():
    models = {**MODELS, "embed-local": {**MODELS["embed-local"], "enabled": False}}
    with pytest.raises(FailedPrecondition, match="embed-local"):
        make_rules(models).route(RouteQuery(kind="embedding"))


def test_negative_estimated_tokens_is_invalid():
    with pytest.raises(InvalidArgument) as caught:
        make_rules().route(RouteQuery(estimated_tokens=-1))
    assert caught.value.field == "estimated_tokens"
