"""Roles and scopes, key rotation and expiry, last-used times and the audit log — the domain classes
against a real Redis of the test's own (no gRPC)."""

from __future__ import annotations

import asyncio
import time

import pytest
from sophia.gateway.v1 import admin_pb2

from libs.config import AuditConfig, AuthConfig
from libs.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from services.gateway.access.api_keys import KeyRing
from services.gateway.access.audit import AuditEntry, AuditLog, AuditOutcome, AuditQuery
from services.gateway.access.control import AccessControl
from services.gateway.access.key_store import NewKey
from services.gateway.access.roles import AdminPrincipal, Endpoint, KeyScope, Permission, Role
from services.gateway.api.admin_actions import MAX_FIELD_CHARS, REFUSAL_BURST, AdminActions
from services.gateway.api.admin_servicer import new_key

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


async def _refused_within(replica: AccessControl, secret: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await replica.authenticate(bearer(secret))
        except Unauthenticated:
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.mark.parametrize("change", ["rotate", "revoke"])
async def test_a_rotation_or_revocation_stops_the_secret_on_every_replica_at_once(redis_client, change):
    """Another replica remembers the secret for a minute; the announcement drops it there too."""
    keys = KeyRing(AuthConfig())
    here, there = (AccessControl.over_redis(keys, redis_client, key_cache_seconds=60) for _ in range(2))
    for replica in (here, there):
        replica.start()
    try:
        key, old = await here.create_key(NewKey("acme", "backend"))
        await asyncio.sleep(0.2)  # both subscribed
        assert (await there.authenticate(bearer(old))).key_id == key.key_id  # now remembered there
        if change == "rotate":
            await here.rotate_key(key.key_id, grace_seconds=0)
        else:
            await here.revoke_key(key.key_id)
        assert await _refused_within(there, old, seconds=2.0)
    finally:
        for replica in (here, there):
            await replica.close()


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


# --- audited admin actions ---------------------------------------------------------------------------


class _Call:
    """What AdminActions reads of a gRPC call: its metadata."""

    def __init__(self, secret: str) -> None:
        self._metadata = tuple(bearer(secret))

    def invocation_metadata(self):
        return self._metadata


@pytest.fixture
async def audited(access, redis_client):
    audit = AuditLog(redis_client, AuditConfig())
    return AdminActions(access, audit), audit


async def _attempt(actions: AdminActions, secret: str, action: str = "reload_config", **where) -> None:
    with pytest.raises((Unauthenticated, PermissionDenied)):
        async with actions.begin(_Call(secret), action, **where) as step:
            await step.admin()


async def test_attempts_without_a_valid_key_are_recorded_at_a_bounded_rate(audited):
    actions, audit = audited
    for _ in range(REFUSAL_BURST + 70):
        await _attempt(actions, "sk-sophia-not-a-key")
    entries, _ = await audit.read(AuditQuery(page_size=500))
    assert REFUSAL_BURST <= len(entries) <= REFUSAL_BURST + 2  # the burst, and what refilled meanwhile
    await asyncio.sleep(1.1)
    await _attempt(actions, "sk-sophia-not-a-key")
    newest, _ = await audit.read(AuditQuery(page_size=1))
    assert newest[0].outcome is AuditOutcome.DENIED
    assert "unrecorded attempts without a valid admin key" in newest[0].detail


async def test_audited_text_from_the_caller_is_cut(audited):
    actions, audit = audited
    await _attempt(
        actions, "sk-sophia-not-a-key", "create_key", tenant_id="t" * 100_000, target="k" * 100_000
    )
    (found,), _ = await audit.read(AuditQuery(page_size=1))
    assert len(found.tenant_id) <= MAX_FIELD_CHARS and len(found.target) <= MAX_FIELD_CHARS


async def test_an_action_that_fails_unexpectedly_is_audited_as_failed(audited):
    actions, audit = audited
    with pytest.raises(ZeroDivisionError):
        async with actions.begin(_Call("sk-bootstrap-admin-01"), "create_key") as step:
            await step.admin()
            _ = 1 / 0
    (found,), _ = await audit.read(AuditQuery(page_size=1))
    assert (found.action, found.outcome) == ("create_key", AuditOutcome.FAILED)
    assert "ZeroDivisionError" in found.detail


async def test_a_scoped_key_asking_for_every_tenant_is_refused_on_record(audited, access):
    actions, audit = audited
    _, secret = await access.create_key(NewKey("", "ops", role=Role.OPERATOR, tenants=("acme",)))
    with pytest.raises(PermissionDenied):
        async with actions.begin(_Call(secret), "read_audit", audit_success=False) as step:
            await step.admin()
            await step.require_all_tenants(Permission.READ_AUDIT)
    (found,), _ = await audit.read(AuditQuery(page_size=1))
    assert (found.action, found.outcome, found.role) == ("read_audit", AuditOutcome.DENIED, "operator")


def test_a_key_cannot_expire_past_what_a_timestamp_holds():
    request = admin_pb2.CreateApiKeyRequest(tenant_id="acme")
    request.expires_at.seconds = 253_402_300_800  # 10000-01-01: stored, it broke every listing
    with pytest.raises(InvalidArgument) as caught:
        new_key(request, time.time())
    assert caught.value.field == "expires_at"
