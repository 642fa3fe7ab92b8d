"""Cache key derivation: distinct inputs never share a key, and namespaces cannot be escaped."""

from fnmatch import fnmatchcase

import pytest

from services.cache import keys


def test_key_is_stable_and_namespaced():
    key = keys.exact_key("acme", "smollm2", '{"messages":[]}')
    assert key == keys.exact_key("acme", "smollm2", '{"messages":[]}')
    assert key.startswith("sophia:cache:exact:")
    assert fnmatchcase(key, keys.exact_pattern("acme", "smollm2"))
    assert fnmatchcase(key, keys.exact_pattern("acme"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # A delimiter-joined encoding would make these collide.
        (("a:b", "c", "k"), ("a", "b:c", "k")),
        (("a", "b", "c:k"), ("a", "b:c", "k")),
        (("a\x00b", "c", "k"), ("a", "b\x00c", "k")),
        (('a","b', "c", "k"), ("a", 'b","c', "k")),
        (("acme", "m", "k"), ("other", "m", "k")),
        (("acme", "m1", "k"), ("acme", "m2", "k")),
    ],
)
def test_distinct_inputs_get_distinct_keys(first, second):
    assert keys.entry_digest(*first) != keys.entry_digest(*second)
    assert keys.exact_key(*first) != keys.exact_key(*second)


@pytest.mark.parametrize("tenant", ["acme:x", "acme*", "*", "acme?", "[a]cme", "acme\\"])
def test_tenant_patterns_do_not_reach_other_tenants(tenant):
    """Raw tenant ids in keys would let "acme*" or "acme:x" match acme's entries in a SCAN."""
    acme_key = keys.exact_key("acme", "m", "k")
    assert not fnmatchcase(acme_key, keys.exact_pattern(tenant))
    assert not fnmatchcase(keys.exact_key(tenant, "m", "k"), keys.exact_pattern("acme"))
    # Tags are hex, so the only glob character in a pattern is the trailing '*'.
    assert "*" not in keys.exact_pattern(tenant)[:-1]
    assert "?" not in keys.exact_pattern(tenant) and "[" not in keys.exact_pattern(tenant)


def test_model_pattern_covers_only_that_model():
    assert not fnmatchcase(keys.exact_key("acme", "m1", "k"), keys.exact_pattern("acme", "m2"))
    assert fnmatchcase(keys.exact_key("acme", "m2", "k"), keys.exact_pattern("acme", "m2"))


def test_tenant_and_model_tags_are_kept_apart():
    assert keys.namespace_tag("tenant", "x") != keys.namespace_tag("model", "x")


def test_stats_key_is_outside_the_entry_namespace():
    assert not fnmatchcase(keys.stats_key("acme"), keys.exact_pattern("acme"))
    assert keys.stats_key("acme") != keys.stats_key("acme:x")
