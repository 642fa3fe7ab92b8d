"""The Router's stages as plain Python: rules, classification, preferences, filters, flags, budget.

The classifier here is the real one, trained on examples whose embeddings are made in the test: each
task type and difficulty gets its own direction, so which class a prompt falls in is known.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest

from libs.config import Config
from libs.errors import FailedPrecondition, InvalidArgument
from libs.feature_flags import parse_flags
from services.router.classifier import Difficulty, Example, ExampleSet, TaskClassifier
from services.router.router import Decision, Preference, Request, Router, RoutingState

DIMENSIONS = 384
TASKS = ("general", "code", "translation")

MODELS: dict[str, dict[str, Any]] = {
    "local-small": {"provider": "local", "context_window": 8192},
    "mini": {"provider": "openai", "context_window": 128000},
    "big": {"provider": "openai", "context_window": 128000},
    "claude": {"provider": "anthropic", "context_window": 200000},
    "coder": {"provider": "openai", "context_window": 16000},
    "old": {"provider": "openai", "enabled": False},
    "embed-local": {"provider": "local", "kind": "embedding", "context_window": 256},
}
PRICES = {
    "mini": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6},
    "big": {"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10},
    "claude": {"input_per_mtok_usd": 3, "output_per_mtok_usd": 15},
    "coder": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2},
}
PROFILES = {
    "local-small": {"quality": 1, "tools": False, "response_format": False},
    "mini": {"quality": 2, "tools": True, "response_format": True},
    "big": {"quality": 4, "tools": True, "response_format": True, "code": True},
    "claude": {"quality": 5, "tools": True, "response_format": False},
    "coder": {"quality": 3, "code": True, "tools": False, "response_format": False},
}


def direction(task: str, difficulty: Difficulty) -> np.ndarray:
    vector = np.zeros(DIMENSIONS)
    vector[TASKS.index(task)] = 1.0
    vector[10 if difficulty is Difficulty.COMPLEX else 11] = 1.0
    return vector / np.linalg.norm(vector)


def classifier() -> TaskClassifier:
    rng = np.random.default_rng(0)
    examples, vectors = [], []
    for task in TASKS:
        for difficulty in Difficulty:
            for n in range(6):
                examples.append(Example(f"{task} {difficulty} {n}", task, difficulty))
                noisy = direction(task, difficulty) + rng.normal(0, 0.02, DIMENSIONS)
                vectors.append(noisy / np.linalg.norm(noisy))
    example_set = ExampleSet(TASKS, {t: () for t in TASKS}, tuple(examples))
    return TaskClassifier(example_set, np.array(vectors), complex_threshold=0.5)


CLASSIFIER = classifier()


def make_router(flags: str = "", **routing: Any) -> Router:
    config = Config.model_validate(
        {
            "providers": {
                "local": {"type": "local"},
                "openai": {"type": "openai", "base_url": "http://127.0.0.1:1"},
                "anthropic": {"type": "anthropic", "base_url": "http://127.0.0.1:1"},
            },
            "models": MODELS,
            "ledger": {"prices": PRICES},
            "routing": {
                "default_chain": ["local-small"],
                "default_embedding_model": "embed-local",
                "model_profiles": PROFILES,
                **routing,
            },
        }
    )
    return Router(RoutingState(config, CLASSIFIER, parse_flags(flags)), health=None)


def plan(router: Router, task: str = "general", difficulty: Difficulty = Difficulty.SIMPLE, **fields):
    fields.setdefault("prompt", "a prompt")
    fields.setdefault("embedding", direction(task, difficulty).tolist())
    return asyncio.run(router.route(Request(**fields)))


def models(result) -> list[str]:
    return [t.model_id for t in result.targets]


# --- classification and balanced plans --------------------------------------------------------------


def test_simple_prompt_goes_to_the_cheapest_capable_model_first():
    result = plan(make_router(), "general", Difficulty.SIMPLE)
    # local-small costs nothing; then by price.
    assert models(result) == ["local-small", "mini", "coder", "big", "claude"]
    assert (result.task_type, result.difficulty, result.decision) == (
        "general",
        Difficulty.SIMPLE,
        Decision.SIMPLE_CHEAPEST,
    )
    assert result.confidence > 0.5
    assert "balanced: simple prompt" in result.reason and "difficulty=simple" in result.reason


def test_complex_prompt_goes_to_the_quality_chain_or_best_first():
    assert models(plan(make_router(), "general", Difficulty.COMPLEX)) == [
        "claude",
        "big",
        "coder",
        "mini",
        "local-small",
    ]
    configured = make_router(preferences={"quality": ["big", "claude"]})
    result = plan(configured, "general", Difficulty.COMPLEX)
    assert models(result) == ["big", "claude", "local-small"]
    assert result.decision is Decision.COMPLEX_QUALITY


def test_a_classified_task_type_with_a_rule_takes_the_rule():
    result = plan(make_router(task_types={"code": ["coder", "big"]}), "code", Difficulty.SIMPLE)
    assert models(result) == ["coder", "big", "local-small"]
    assert result.decision is Decision.TASK_TYPE_RULE and result.task_type == "code"


def test_the_clients_task_type_wins_over_the_classifier():
    router = make_router(task_types={"translation": ["claude"], "code": ["coder"]})
    result = plan(router, "code", Difficulty.SIMPLE, task_type="translation")
    assert models(result) == ["claude", "local-small"]
    assert result.task_type == "translation" and result.confidence == 0.0


def test_a_task_type_without_a_rule_is_named_and_routing_goes_on():
    result = plan(make_router(), "general", Difficulty.SIMPLE, task_type="poetry")
    assert "task_type 'poetry' has no rule" in result.reason
    assert models(result)[0] == "local-small"


def test_an_embedding_of_the_wrong_size_is_invalid_naming_the_field():
    with pytest.raises(InvalidArgument) as caught:
        plan(make_router(), embedding=[0.1] * 10)
    assert caught.value.field == "prompt_embedding"


@pytest.mark.parametrize("scale", [3e38, 1e300, 1e-300])
def test_an_embedding_of_huge_or_tiny_values_is_classified_by_its_direction(scale):
    """Finite but far from unit length (MiniLM's are L2-normalised): its similarities once overflowed
    into a NaN confidence."""
    expected = plan(make_router(), "code", Difficulty.COMPLEX)
    result = plan(make_router(), embedding=(direction("code", Difficulty.COMPLEX) * scale).tolist())
    assert math.isfinite(result.confidence) and 0 < result.confidence <= 1
    assert (result.task_type, result.difficulty) == ("code", Difficulty.COMPLEX)
    assert result.confidence == pytest.approx(expected.confidence)


def test_an_embedding_of_zeros_is_still_classified():
    assert math.isfinite(plan(make_router(), embedding=[0.0] * DIMENSIONS).confidence)


def test_the_router_embeds_only_when_the_plan_depends_on_it():
    embedded: list[str] = []

    async def embed(prompt: str):
        embedded.append(prompt)
        return direction("code", Difficulty.COMPLEX).tolist()

    router = Router(make_router(task_types={"translation": ["mini"]}).state, health=None, embed=embed)
    result = plan(router, prompt="fix my loop", embedding=None)
    assert (embedded, result.task_type, result.difficulty) == (["fix my loop"], "code", Difficulty.COMPLEX)
    plan(router, prompt="fast one", embedding=None, preference=Preference.FAST)
    plan(router, prompt="ruled", embedding=None, task_type="translation")
    assert embedded == ["fix my loop"]
    # Given by the caller (the cache's vector), it is used whatever the preference: for the headers.
    assert plan(router, "translation", prompt="x", preference=Preference.FAST).task_type == "translation"


def test_without_a_prompt_nothing_is_classified():
    result = plan(make_router(), prompt="", embedding=None)
    assert result.task_type == "" and result.difficulty is None


# --- preferences -----------------------------------------------------------------------------------


def test_quality_preference_is_best_first_and_code_prefers_code_models():
    router = make_router()
    assert models(plan(router, preference=Preference.QUALITY))[:2] == ["claude", "big"]
    assert models(plan(router, preference=Preference.CODE))[:2] == ["big", "coder"]


def test_a_configured_preference_chain_is_used_as_configured():
    router = make_router(preferences={"code": ["coder", "mini"]})
    assert models(plan(router, preference=Preference.CODE)) == ["coder", "mini", "local-small"]


def test_fast_without_live_latency_falls_back_to_cost():
    assert models(plan(make_router(), preference=Preference.FAST))[:2] == ["local-small", "mini"]


# --- filters, flags, budget ------------------------------------------------------------------------


def test_tools_and_response_format_skip_models_without_them():
    result = plan(make_router(), "general", Difficulty.SIMPLE, uses_tools=True)
    assert models(result) == ["mini", "big", "claude"]
    assert "skipped local-small (no tools)" in result.reason
    result = plan(make_router(), "general", Difficulty.COMPLEX, uses_response_format=True)
    assert models(result) == ["big", "mini"]


def test_capabilities_not_stated_are_left_to_the_gateway():
    router = make_router(model_profiles={"big": {"quality": 4}})
    assert "local-small" in models(plan(router, "general", Difficulty.SIMPLE, uses_tools=True))


def test_context_window_filter_applies_to_scored_plans():
    result = plan(make_router(), "general", Difficulty.SIMPLE, estimated_tokens=20000)
    assert models(result) == ["mini", "big", "claude"]


def test_nothing_that_fits_is_a_failed_precondition():
    with pytest.raises(FailedPrecondition, match="no model can serve"):
        plan(make_router(), estimated_tokens=500000)


def test_a_model_flagged_off_for_the_tenant_is_never_routed():
    flags = (
        "models:\n  claude: {enabled: false}\n  big: {rollout_percentage: 0, tenant_overrides: {vip: 100}}\n"
    )
    router = make_router(flags)
    assert "claude" not in models(plan(router, "general", Difficulty.COMPLEX, tenant_id="acme"))
    assert "big" not in models(plan(router, "general", Difficulty.COMPLEX, tenant_id="acme"))
    assert models(plan(router, "general", Difficulty.COMPLEX, tenant_id="vip"))[0] == "big"


def test_a_tenant_near_its_budget_gets_the_cheapest_first():
    router = make_router(budget_cheaper_above=0.8)
    result = plan(router, "general", Difficulty.COMPLEX, budget_used_fraction=0.9)
    assert models(result)[0] == "local-small"
    assert result.decision is Decision.BUDGET and "budget 90% used" in result.reason
    assert models(plan(router, "general", Difficulty.COMPLEX, budget_used_fraction=0.5))[0] == "claude"


def test_explicit_models_keep_their_fallbacks_and_skip_flagged_ones():
    router = make_router("models:\n  claude: {enabled: false}\n", fallback_map={"big": ["claude", "mini"]})
    result = plan(router, model="big")
    assert models(result) == ["big", "mini"]
    assert result.decision is Decision.EXPLICIT_MODEL
    assert "skipped claude (flag off for this tenant)" in result.reason
