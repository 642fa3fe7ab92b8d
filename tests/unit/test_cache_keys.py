"""Cache key derivation: distinct inputs never share a key, and namespaces cannot be escaped."""

import pytest

from services.cache import keys


def test_entry_key_is_stable_and_namespaced():
    member = keys.entry_member("smollm2", keys.entry_digest("acme", "smollm2", "scope", "question"))
    key = keys.entry_key("acme", member)
    assert key == keys.entry_key(
        "acme", keys.entry_member("smollm2", keys.entry_digest("acme", "smollm2", "scope", "question"))
    )
    assert key.startswith(keys.entry_prefix("acme"))
    assert keys.tenant_tag_of(key) == keys.namespace_tag("tenant", "acme")
    assert member.startswith(keys.model_member_prefix("smollm2"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # A delimiter-joined encoding would make these collide.
        (("a:b", "c", "s", "q"), ("a", "b:c", "s", "q")),
        (("a", "b", "c:s", "q"), ("a", "b:c", "s", "q")),
        (("a\x00b", "c", "s", "q"), ("a", "b\x00c", "s", "q")),
        (('a","b', "c", "s", "q"), ("a", 'b","c', "s", "q")),
        (("acme", "m", "s", "q"), ("other", "m", "s", "q")),
        (("acme", "m1", "s", "q"), ("acme", "m2", "s", "q")),
        (("acme", "m", "system: be brief", "q"), ("acme", "m", "system: be long", "q")),
    ],
)
def test_distinct_inputs_get_distinct_keys(first, second):
    assert keys.entry_digest(*first) != keys.entry_digest(*second)
    assert keys.scope_digest(*first[:3]) != keys.scope_digest(*second[:3])


@pytest.mark.parametrize("tenant", ["acme:x", "acme*", "*", "acme?", "[a]cme", "acme\\"])
def test_tenant_ids_never_appear_raw(tenant):
    """Raw tenant ids in keys would let "acme*" or "acme:x" reach acme's namespace."""
    assert keys.entry_prefix(tenant) != keys.entry_prefix("acme")
    for key in (keys.entry_prefix(tenant), keys.expiry_key(tenant), keys.stats_key(tenant)):
        assert not set("*?[\\") & set(key)


def test_stats_live_outside_the_entry_namespace():
    assert not keys.stats_key("acme").startswith(keys.ENTRY)
    assert not keys.expiry_key("acme").startswith(keys.ENTRY)
