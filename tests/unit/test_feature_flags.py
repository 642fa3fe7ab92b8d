"""Feature flags (libs/feature_flags.py): evaluation, validation and reload from a real file."""

from __future__ import annotations

import asyncio
import os

import pytest

from libs.feature_flags import FeatureFlags, FlagError, parse_flags

FLAGS = """
models:
  gpt-4o: {rollout_percentage: 30, tenant_overrides: {acme: 100, enterprise: 100, globex: 0}}
  retired: {enabled: false, tenant_overrides: {acme: 100}}
features:
  semantic_caching: {enabled: true, rollout_percentage: 50}
  request_batching: {enabled: false}
"""


def test_rollout_is_deterministic_per_tenant_and_close_to_the_percentage():
    flags = parse_flags(FLAGS)
    tenants = [f"tenant-{n}" for n in range(4000)]
    first = [flags.model_enabled("gpt-4o", t) for t in tenants]
    assert first == [flags.model_enabled("gpt-4o", t) for t in tenants]
    assert 0.27 <= sum(first) / len(tenants) <= 0.33
    cached = sum(flags.enabled("semantic_caching", t) for t in tenants) / len(tenants)
    assert 0.47 <= cached <= 0.53


def test_each_flag_picks_its_own_tenants():
    flags = parse_flags("features:\n  a: {rollout_percentage: 50}\n  b: {rollout_percentage: 50}\n")
    tenants = [f"t{n}" for n in range(2000)]
    same = sum(flags.enabled("a", t) == flags.enabled("b", t) for t in tenants) / len(tenants)
    assert 0.45 <= same <= 0.55


def test_raising_the_percentage_only_adds_tenants():
    low = parse_flags("features:\n  x: {rollout_percentage: 20}\n")
    high = parse_flags("features:\n  x: {rollout_percentage: 60}\n")
    tenants = [f"t{n}" for n in range(2000)]
    assert all(high.enabled("x", t) for t in tenants if low.enabled("x", t))


def test_overrides_tenant_then_tier_then_percentage():
    flags = parse_flags(FLAGS)
    assert flags.model_enabled("gpt-4o", "acme")
    assert not flags.model_enabled("gpt-4o", "globex", tier="enterprise")  # the tenant's own wins
    outsiders = [t for t in (f"t{n}" for n in range(200)) if not flags.model_enabled("gpt-4o", t)]
    assert all(flags.model_enabled("gpt-4o", t, tier="enterprise") for t in outsiders)


def test_disabled_wins_over_everything_and_unknown_flags_default():
    flags = parse_flags(FLAGS)
    assert not flags.model_enabled("retired", "acme")
    assert not flags.enabled("request_batching", "acme")
    assert flags.model_enabled("unlisted-model", "acme")  # models are on unless listed
    assert not flags.enabled("unlisted-feature", "acme")  # features are off unless listed


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("models:\n  m: {rollout_percentage: 150}\n", "models.m.rollout_percentage"),
        ("models:\n  m: {tenant_overrides: {acme: -1}}\n", "tenant_overrides.acme"),
        ("features:\n  f: {enabeld: true}\n", "features.f.enabeld"),
        ("flags: {}\n", "flags"),
        ("- a list\n", "top level"),
        ("models: [unclosed\n", "invalid YAML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_problem(text, named):
    with pytest.raises(FlagError, match=r"flags\.yaml") as caught:
        parse_flags(text, "flags.yaml")
    assert named in str(caught.value)


def test_reload_on_change_keeps_the_old_flags_when_the_new_file_is_bad(tmp_path):
    path = tmp_path / "flags.yaml"
    path.write_text("features:\n  semantic_caching: {rollout_percentage: 0}\n")
    flags = FeatureFlags(path)

    async def scenario():
        flags.start_watching(interval_seconds=0.05)
        try:
            assert not flags.enabled("semantic_caching", "acme")
            path.write_text("features:\n  semantic_caching: {rollout_percentage: 100}\n")
            os.utime(path, ns=(1, 10**18))  # a different mtime even within the clock's resolution
            await _until(lambda: flags.enabled("semantic_caching", "acme"))
            path.write_text("features:\n  semantic_caching: {rollout_percentage: 101}\n")
            os.utime(path, ns=(1, 2 * 10**18))
            await _until(lambda: bool(flags.last_error))
            assert "rollout_percentage" in flags.last_error
            assert flags.enabled("semantic_caching", "acme")  # the old flags stay
        finally:
            await flags.aclose()

    asyncio.run(scenario())


def test_an_unreadable_file_at_start_is_an_error_naming_it(tmp_path):
    with pytest.raises(FlagError, match=r"cannot read flag file .*missing\.yaml"):
        FeatureFlags(tmp_path / "missing.yaml")


async def _until(condition) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the watcher has no event to wait on
            await asyncio.sleep(0.02)


def test_a_tenants_tier_from_the_config_applies_its_tier_overrides(tmp_path):
    """`auth.tenants.<id>.tier` names the tier the flags' tenant_overrides may switch; the tenant's own id
    still wins."""
    path = tmp_path / "flags.yaml"
    path.write_text(
        "models:\n"
        "  big-model: {rollout_percentage: 100, tenant_overrides: {free: 0, acme-vip: 100}}\n"
        "features:\n"
        "  semantic_caching: {rollout_percentage: 0, tenant_overrides: {enterprise: 100}}\n"
    )
    flags = FeatureFlags(path, tiers={"acme": "free", "acme-vip": "free", "bigco": "enterprise"})
    assert not flags.model_enabled("big-model", "acme")
    assert flags.model_enabled("big-model", "acme-vip")  # its own id wins over its tier
    assert flags.model_enabled("big-model", "no-tier")
    assert flags.enabled("semantic_caching", "bigco") and not flags.enabled("semantic_caching", "acme")
    assert flags.tier_of("bigco") == "enterprise" and flags.tier_of("unknown") == ""
