"""Roles and scopes, key rotation and expiry, last-used times and the audit log — the domain classes
against a real Redis of the test's own (no gRPC)."""

from __future__ import annotations

import asyncio
import time

import pytest

from libs.config import AuditConfig, AuthConfig
from libs.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from services.gateway.access.api_keys import KeyRing
from services.gateway.access.audit import AuditEntry, AuditLog, AuditOutcome, AuditQuery
from services.gateway.access.control import AccessControl
from services.gateway.access.key_store import NewKey
from services.gateway.access.roles import AdminPrincipal, Endpoint, KeyScope, Permission, Role

# --- roles and scopes (pure) ------------------------------------------------------------------------


def test_an_admin_may_do_everything_for_every_tenant():
    admin = AdminPrincipal("k", Role.ADMIN)
    assert all(admin.may(permission, "any-tenant") for permission in Permission)


@pytest.mark.parametrize(
    ("permission", "operator", "viewer"),
    [
        (Permission.MANAGE_ADMIN_KEYS, False, False),
        (Permission.MANAGE_KEYS, True, False),
        (Permission.SET_BUDGET, True, False),
        (Permission.INVALIDATE_CACHE, True, False),
        (Permission.RELOAD_CONFIG, True, False),
        (Permission.READ_USAGE, True, True),
        (Permission.READ_AUDIT, True, True),
    ],
)
def test_operators_and_viewers_hold_their_roles_permissions(permission, operator, viewer):
    assert AdminPrincipal("o", Role.OPERATOR).may(permission) is operator
    assert AdminPrincipal("v", Role.VIEWER).may(permission) is viewer


def test_a_refusal_says_what_is_missing():
    viewer = AdminPrincipal("key_v", Role.VIEWER, ("acme",))
    with pytest.raises(PermissionDenied) as by_role:
        viewer.require(Permission.SET_BUDGET, "acme")
    assert by_role.value.message == "key key_v has role viewer; set_budget needs admin or operator"
    with pytest.raises(PermissionDenied) as by_tenant:
        viewer.require(Permission.READ_USAGE, "globex")
    assert by_tenant.value.message == "key key_v is scoped to tenants acme; not 'globex'"
    viewer.require(Permission.READ_USAGE, "acme")
    with pytest.raises(PermissionDenied, match="name one of them"):
        viewer.require_all_tenants(Permission.READ_USAGE)


def test_key_scopes_match_model_patterns_and_endpoints():
    scope = KeyScope(models=("gpt-4o-mini", "smollm2-*"), endpoints=(Endpoint.CHAT,))
    assert scope.allows_model("smollm2-135m-instruct") and scope.allows_model("gpt-4o-mini")
    assert not scope.allows_model("gpt-4o")
    with pytest.raises(
        PermissionDenied, match="may use only the models gpt-4o-mini, smollm2-\\*; not 'gpt-4o'"
    ):
        scope.require_model("key_s", "gpt-4o")
    with pytest.raises(PermissionDenied, match="may call only chat; not embeddings"):
        scope.require_endpoint("key_s", Endpoint.EMBEDDINGS)
    KeyScope().require_model("key_all", "anything")


# --- against a real Redis ---------------------------------------------------------------------------


@pytest.fixture
async def access(redis_client):
    keys = KeyRing(AuthConfig(admin_key="sk-bootstrap-admin-01"))
    control = AccessControl.over_redis(keys, redis_client, key_cache_seconds=0)
    yield control
    await control.close()


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


async def test_rotation_keeps_the_old_secret_for_the_grace_period_only(access):
    key, old = await access.create_key(NewKey("acme", "backend", requests_per_minute=60))
    rotated, new = await access.rotate_key(key.key_id, grace_seconds=2)
    assert (rotated.key_id, rotated.tenant_id, rotated.requests_per_minute) == (key.key_id, "acme", 60)
    assert rotated.rotated_at >= key.created and new != old
    for secret in (old, new):
        assert (await access.authenticate(bearer(secret))).key_id == key.key_id
    # The grace period ends at rotated_at + 2 (rotated_at is rounded up to the second).
    await asyncio.sleep(max(0.0, rotated.rotated_at + 2 + 0.1 - time.time()))
    with pytest.raises(Unauthenticated, match="grace period is over"):
        await access.authenticate(bearer(old))
    assert (await access.authenticate(bearer(new))).key_id == key.key_id


async def test_rotation_without_grace_stops_the_old_secret_at_once(access):
    key, old = await access.create_key(NewKey("acme", "backend"))
    _, new = await access.rotate_key(key.key_id, grace_seconds=0)
    with pytest.raises(Unauthenticated):
        await access.authenticate(bearer(old))
    await access.authenticate(bearer(new))


async def test_revoking_a_rotated_key_stops_every_secret(access):
    key, old = await access.create_key(NewKey("acme", "backend"))
    _, new = await access.rotate_key(key.key_id, grace_seconds=3600)
    await access.revoke_key(key.key_id)
    for secret in (old, new):
        with pytest.raises(Unauthenticated):
            await access.authenticate(bearer(secret))
    with pytest.raises(FailedPrecondition, match="revoked"):
        await access.rotate_key(key.key_id, 0)


async def test_an_expired_key_is_refused(access):
    _, secret = await access.create_key(NewKey("acme", "short-lived", expires_at=int(time.time()) + 1))
    await access.authenticate(bearer(secret))
    await asyncio.sleep(1.1)
    with pytest.raises(Unauthenticated, match="expired"):
        await access.authenticate(bearer(secret))


async def test_stored_admin_keys_carry_their_role_and_tenants(access):
    _, secret = await access.create_key(NewKey("", "ops", role=Role.OPERATOR, tenants=("acme",)))
    operator = await access.authenticate_admin(bearer(secret))
    assert (operator.role, operator.tenants) == (Role.OPERATOR, ("acme",))
    with pytest.raises(PermissionDenied):
        await access.authenticate(bearer(secret))


async def test_scoped_keys_keep_their_scope(access):
    scope = KeyScope(models=("smollm2-*",), endpoints=(Endpoint.CHAT,))
    _, secret = await access.create_key(NewKey("acme", "chat-only", scope=scope))
    assert (await access.authenticate(bearer(secret))).scope == scope


async def test_listing_shows_when_keys_were_last_used(access):
    key, secret = await access.create_key(NewKey("acme", "used"))
    unused, _ = await access.create_key(NewKey("acme", "unused"))
    before = int(time.time())
    await access.authenticate(bearer(secret))
    await access.flush_last_used()
    listed = {k.key_id: k for k in await access.list_keys("acme")}
    assert listed[key.key_id].last_used >= before
    assert listed[unused.key_id].last_used == 0


async def test_config_keys_cannot_be_rotated(access):
    with pytest.raises(FailedPrecondition, match="config file"):
        await access.rotate_key("cfg-admin", 0)


# --- the audit log ----------------------------------------------------------------------------------


def entry(action: str, tenant: str = "acme", outcome: AuditOutcome = AuditOutcome.OK) -> AuditEntry:
    return AuditEntry(time.time(), "key_admin", "admin", action, tenant, "key_x", outcome, "req-1")


async def test_the_audit_log_reads_newest_first_with_filters_and_pages(redis_client):
    audit = AuditLog(redis_client, AuditConfig())
    for i in range(7):
        await audit.record(entry("create_key" if i % 2 else "set_budget", tenant=f"t{i % 3}"))
    page, token = await audit.read(AuditQuery(page_size=3))
    assert len(page) == 3 and token
    rest, end = await audit.read(AuditQuery(page_size=10, page_token=token))
    assert len(rest) == 4 and end == ""
    everything = page + rest
    assert [e.entry_id for e in everything] == sorted((e.entry_id for e in everything), reverse=True)
    budgets, _ = await audit.read(AuditQuery(action="set_budget"))
    assert len(budgets) == 4 and all(e.action == "set_budget" for e in budgets)
    t1, _ = await audit.read(AuditQuery(tenant_id="t1"))
    assert {e.tenant_id for e in t1} == {"t1"} and len(t1) == 2


async def test_the_audit_log_keeps_at_most_its_limit(redis_client):
    audit = AuditLog(redis_client, AuditConfig(max_entries=5))
    for _ in range(300):
        await audit.record(entry("create_key"))
    # Trimming is approximate (whole radix-tree nodes, about 100 entries); far fewer than written remain.
    assert await redis_client.xlen("gateway:audit:log") < 300


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"page_size": 0}, "page_size"),
        ({"page_size": 501}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"since": 20.0, "until": 10.0}, "since"),
    ],
)
def test_bad_audit_queries_name_the_field(query, field):
    with pytest.raises(InvalidArgument) as caught:
        AuditQuery(**query)
    assert caught.value.field == field
