"""Gateway access control without a running Redis: key cache, admin validation, fail-open on Redis loss."""

from __future__ import annotations

import logging
import re

import pytest

from libs.config import load_config
from libs.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from libs.redis_store import open_redis
from services.gateway.access.api_keys import ApiKey, KeyRing
from services.gateway.access.control import AccessControl
from services.gateway.access.key_store import RecentKeys, new_secret
from services.gateway.access.roles import Role
from services.gateway.api.admin_servicer import group_by, monthly_limit_micros, parse_time, validate_new_key
from services.gateway.domain import Principal
from tests.support import free_port

ALICE = Principal(tenant_id="t", key_id="key_alice", requests_per_minute=1)
BOB = Principal(tenant_id="t", key_id="key_bob")
ALICE_KEY = ApiKey("key_alice", "t", "alice", 1, 0, created=1)
BOB_KEY = ApiKey("key_bob", "t", "bob", 0, 0, created=1)
CONFIG_KEY = "sk-config-key-0001"
ADMIN_KEY = "admin-key-0001"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_remembered_keys_expire_after_the_ttl():
    clock = Clock()
    recent = RecentKeys(5.0, 10, clock)
    recent.put("d1", ALICE_KEY, 0)
    clock.now += 4.9
    assert recent.get("d1") == ALICE_KEY
    clock.now += 0.1
    assert recent.get("d1") is None
    assert len(recent) == 0


def test_remembered_keys_are_bounded_and_drop_the_oldest():
    recent = RecentKeys(60.0, 2, Clock())
    recent.put("d1", ALICE_KEY, 0)
    recent.put("d2", BOB_KEY, 0)
    recent.put("d3", BOB_KEY, 0)
    assert recent.get("d1") is None
    assert recent.get("d2") == BOB_KEY and recent.get("d3") == BOB_KEY


def test_forgetting_a_key_drops_every_entry_of_it():
    recent = RecentKeys(60.0, 10, Clock())
    recent.put("d1", ALICE_KEY, 0)
    recent.put("d2", BOB_KEY, 0)
    recent.forget("key_alice")
    assert recent.get("d1") is None
    assert recent.get("d2") == BOB_KEY


def test_a_remembered_secret_stops_at_its_end_even_before_the_ttl():
    clock, wall = Clock(), Clock()
    recent = RecentKeys(60.0, 10, clock, wall)
    recent.put("d1", ALICE_KEY, valid_until=wall.now + 2)  # a rotated secret in its grace period
    wall.now += 1.9
    assert recent.get("d1") == ALICE_KEY
    wall.now += 0.1
    assert recent.get("d1") is None


def test_a_zero_ttl_remembers_nothing():
    recent = RecentKeys(0.0, 10, Clock())
    recent.put("d1", ALICE_KEY, 0)
    assert recent.get("d1") is None


def test_secrets_have_the_prefix_and_32_url_safe_characters():
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(re.fullmatch(r"sk-sophia-[A-Za-z0-9_-]{32}", secret) for secret in secrets)


@pytest.mark.parametrize(
    ("tenant_id", "name", "rpm", "tpm", "field"),
    [
        ("", "n", 0, 0, "tenant_id"),
        ("a" * 65, "n", 0, 0, "tenant_id"),
        ("acme/eu", "n", 0, 0, "tenant_id"),
        ("acme{x}", "n", 0, 0, "tenant_id"),
        ("acme", "n" * 129, 0, 0, "name"),
        ("acme", "n", -1, 0, "requests_per_minute"),
        ("acme", "n", 0, -1, "tokens_per_minute"),
    ],
)
def test_new_keys_are_validated_field_by_field(tenant_id, name, rpm, tpm, field):
    with pytest.raises(InvalidArgument) as caught:
        validate_new_key(tenant_id, name, rpm, tpm)
    assert caught.value.field == field


def test_valid_new_key_passes():
    validate_new_key("Acme_eu.prod-1", "n" * 128, 0, 10_000)
    validate_new_key("a" * 64, "", 60, 0)


def test_budget_dollars_become_exact_micro_dollars():
    assert monthly_limit_micros(12.34) == 12_340_000
    assert monthly_limit_micros(0) == 0
    for bad in (-0.01, float("nan"), float("inf"), 2e9):
        with pytest.raises(InvalidArgument, match="monthly_limit_usd"):
            monthly_limit_micros(bad)


def test_rfc3339_times_parse_with_their_offset():
    assert parse_time("start_time", "") is None
    assert parse_time("start_time", "2025-03-01T00:00:00Z").seconds == 1740787200
    assert parse_time("start_time", "2025-03-01t02:00:00.5+02:00").seconds == 1740787200
    for bad in ("2025-03-01", "2025-03-01T00:00:00", "yesterday", "2025-13-01T00:00:00Z"):
        with pytest.raises(InvalidArgument) as caught:
            parse_time("end_time", bad)
        assert caught.value.field == "end_time"


def test_group_by_accepts_the_ledgers_groupings_only():
    """The admin API groups as the tenant's own usage report does (the MCP tool offers both)."""
    assert {group_by(v) for v in ("", "model")} == {group_by("model")}
    assert len({group_by(v) for v in ("model", "provider", "day", "task_type", "difficulty")}) == 5
    with pytest.raises(InvalidArgument, match="group_by"):
        group_by("week")


async def test_admin_api_is_disabled_without_an_admin_key(access_without_redis):
    with pytest.raises(PermissionDenied, match="admin API is disabled"):
        await access_without_redis.authenticate_admin(bearer("anything"))


async def test_the_bootstrap_admin_key_is_an_admin(access_without_redis_with_admin):
    admin = await access_without_redis_with_admin.authenticate_admin(bearer(ADMIN_KEY))
    assert (admin.key_id, admin.role, admin.tenants) == ("cfg-admin", Role.ADMIN, ())
    with pytest.raises(Unauthenticated):
        await access_without_redis_with_admin.authenticate_admin(bearer("admin-key-0002"))


async def test_keys_are_refused_on_the_other_plane(access_without_redis_with_admin):
    with pytest.raises(PermissionDenied, match="is a tenant key; the admin API needs an admin key"):
        await access_without_redis_with_admin.authenticate_admin(bearer(CONFIG_KEY))
    with pytest.raises(PermissionDenied, match=r"admin key \(role admin\); this API needs a tenant key"):
        await access_without_redis_with_admin.authenticate(bearer(ADMIN_KEY))


# --- Redis unreachable: a real client pointed at a port nobody listens on --------------------------


async def _access_without_redis(admin_key: str):
    config = load_config(
        environ={
            "SOPHIA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "SOPHIA__AUTH__TENANTS": f"{{dev: {{api_keys: [{{name: dev, key: {CONFIG_KEY}}}]}}}}",
            "SOPHIA_ADMIN_KEY": admin_key,
        }
    )
    client = open_redis(config.redis.url, timeout_seconds=config.gateway.redis_timeout_seconds)
    access = AccessControl.over_redis(KeyRing(config.auth), client, key_cache_seconds=5)
    yield access
    await access.close()
    await client.aclose()


@pytest.fixture
async def access_without_redis():
    async for access in _access_without_redis(""):
        yield access


@pytest.fixture
async def access_without_redis_with_admin():
    async for access in _access_without_redis(ADMIN_KEY):
        yield access


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def test_config_keys_work_while_redis_is_down(access_without_redis):
    principal = await access_without_redis.authenticate(bearer(CONFIG_KEY))
    assert principal.key_id == "cfg-dev-dev" and principal.tenant_id == "dev"


async def test_stored_keys_are_unavailable_not_invalid_while_redis_is_down(access_without_redis):
    with pytest.raises(Unavailable, match="key store unavailable"):
        await access_without_redis.authenticate(bearer(new_secret()))


async def test_keys_without_the_stored_prefix_are_refused_without_redis(access_without_redis):
    with pytest.raises(Unauthenticated, match="invalid API key"):
        await access_without_redis.authenticate(bearer("sk-someone-elses-key"))
    with pytest.raises(Unauthenticated, match="missing API key"):
        await access_without_redis.authenticate([])


async def test_limits_fail_open_with_a_warning_while_redis_is_down(access_without_redis, caplog):
    with caplog.at_level(logging.WARNING, logger="services.gateway.access.control"):
        for _ in range(3):
            await access_without_redis.admit(ALICE, 10)
        access_without_redis.charge(Principal("t", "key_t", tokens_per_minute=5), 10)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # Three refusals would have been due (limit 1); all got through, and the outage was logged once.
    assert len(warnings) == 1 and "rate limits not enforced" in warnings[0].getMessage()


async def test_unlimited_keys_never_ask_redis(access_without_redis, caplog):
    with caplog.at_level(logging.WARNING, logger="services.gateway.access.control"):
        await access_without_redis.admit(BOB, 10_000)
        access_without_redis.charge(BOB, 10_000)
    assert not caplog.records
