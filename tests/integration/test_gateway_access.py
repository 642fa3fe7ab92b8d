"""API keys, rate limits and the admin API against real processes: Redis, CostLedger, ModelInference, two
Gateway replicas sharing one Redis, and the Envoy edge (REST) in front of the first replica.

Chats ask for one token; the Router and SemanticCache are not started (the Gateway uses its default chain
and bypasses the cache), which keeps the mesh small.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest
import redis
from google.protobuf import json_format
from sophia.gateway.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from libs.config import load_config
from libs.errors import ResourceExhausted
from libs.redis_store import open_redis
from services.gateway.access.api_keys import KeyRing
from services.gateway.access.control import AccessControl
from services.gateway.domain import Principal
from tests.support import free_port, internal_channel, mesh_environ
from tools.mesh import Mesh

ADMIN_KEY = "sk-access-admin-key-01"
DEV_KEY = "sk-access-dev-key-0001"
LIMITED_CONFIG_KEY = "sk-access-limited-key-01"
KEY_CACHE_SECONDS = 1.0
MODEL = "smollm2-135m-instruct"


def _environ(outbox) -> dict[str, str]:
    tenants = (
        f"{{dev: {{api_keys: [{{name: dev, key: {DEV_KEY}}}, "
        f"{{name: limited, key: {LIMITED_CONFIG_KEY}, requests_per_minute: 1}}]}}}}"
    )
    return mesh_environ(
        {
            "SOPHIA_ADMIN_KEY": ADMIN_KEY,
            "SOPHIA__AUTH__TENANTS": tenants,
            "SOPHIA__GATEWAY__KEY_CACHE_SECONDS": str(KEY_CACHE_SECONDS),
            "SOPHIA__GATEWAY__OUTBOX_DIR": str(outbox),
        }
    )


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """(replica A with everything, replica B: a second Gateway process on its own port, same Redis)."""
    environ = _environ(tmp_path_factory.mktemp("outbox-a"))
    first = Mesh(tmp_path_factory.mktemp("access-a"), environ)
    second = Mesh(
        tmp_path_factory.mktemp("access-b"),
        {
            **environ,
            "SOPHIA__SERVICES__GATEWAY__PORT": str(free_port()),
            "SOPHIA__GATEWAY__OUTBOX_DIR": str(tmp_path_factory.mktemp("outbox-b")),
        },
    )
    try:
        first.start("redis")
        first.wait_ready(["redis"], 30)
        for service in ("ledger", "inference", "gateway"):
            first.start(service)
        second.start("gateway")
        first.wait_ready(["ledger", "inference", "gateway"], 300)
        second.wait_ready(["gateway"], 60)
        first.start("envoy")
        first.wait_ready(["envoy"], 60)
        yield first, second
    finally:
        second.stop_all()
        first.stop_all()


@pytest.fixture(scope="module")
def mesh(meshes):
    return meshes[0]


@pytest.fixture(scope="module")
async def stubs(meshes):
    """Gateway and admin stubs per replica: [(gateway, admin) of A, (gateway, admin) of B]."""
    channels = [grpc.aio.insecure_channel(m.address("gateway")) for m in meshes]
    yield [(gateway_pb2_grpc.GatewayServiceStub(c), admin_pb2_grpc.AdminServiceStub(c)) for c in channels]
    for channel in channels:
        await channel.close()


@pytest.fixture(scope="module")
def admin(stubs):
    return stubs[0][1]


@pytest.fixture(scope="module")
def edge(mesh):
    with httpx.Client(base_url=mesh.edge_url, timeout=120) as client:
        yield client


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


ADMIN = auth(ADMIN_KEY)


def chat_request() -> gateway_pb2.CreateChatCompletionRequest:
    body = {"params": {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}}
    return json_format.ParseDict(body, gateway_pb2.CreateChatCompletionRequest())


async def chat_code(gateway, key: str) -> tuple[grpc.StatusCode, dict[str, str], str]:
    """Status code, trailing metadata and details of a one-token chat."""
    try:
        await gateway.CreateChatCompletion(chat_request(), metadata=auth(key), timeout=120)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), dict(exc.trailing_metadata() or ()), exc.details()
    return grpc.StatusCode.OK, {}, ""


async def list_models_code(gateway, key: str) -> grpc.StatusCode:
    try:
        await gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(key), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def create_key(admin, tenant: str = "acme", **limits) -> admin_pb2.CreateApiKeyResponse:
    request = admin_pb2.CreateApiKeyRequest(tenant_id=tenant, name=f"test-{uuid.uuid4().hex[:6]}", **limits)
    return await admin.CreateApiKey(request, metadata=ADMIN, timeout=10)


def wait_for_window_room(mesh: Mesh, seconds: float) -> None:
    """Sleeps into the next one-minute window (by Redis' clock) unless `seconds` remain in this one."""
    with redis.Redis.from_url(mesh.config.redis.url) as client:
        now, micros = client.time()
    left = 60 - (now % 60) - micros / 1e6
    if left < seconds:
        time.sleep(left + 0.05)


# --- keys --------------------------------------------------------------------------------------------


def test_a_key_created_over_rest_serves_a_chat_and_is_stored_hashed(mesh, edge):
    created = edge.post(
        "/admin/v1/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"tenant_id": "acme", "name": "rest", "requests_per_minute": 0, "tokens_per_minute": 0},
    )
    assert created.status_code == 200, created.text
    body = created.json()
    secret, key = body["secret"], body["key"]
    assert secret.startswith("sk-sophia-") and len(secret) == len("sk-sophia-") + 32
    assert key["key_id"].startswith("key_") and len(key["key_id"]) == 16
    assert key["tenant_id"] == "acme" and key["name"] == "rest" and key["revoked"] is False
    assert abs(key["created"] - time.time()) < 60

    reply = edge.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 1

    with redis.Redis.from_url(mesh.config.redis.url, decode_responses=True) as client:
        read = {"hash": client.hgetall, "string": client.get, "stream": client.xrange}
        # Everything the Gateway keeps: keys, last-used times, idempotency answers, the audit log.
        stored = [(name, read[client.type(name)](name)) for name in client.scan_iter("gateway:*")]
    assert key["key_id"] in repr(stored)
    assert secret not in repr(stored)


def test_every_admin_route_answers_over_rest(edge):
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = edge.post("/admin/v1/keys", headers=admin_headers, json={"tenant_id": "rest-t"}).json()
    key_id, secret = created["key"]["key_id"], created["secret"]

    listed = edge.get("/admin/v1/keys", params={"tenant_id": "rest-t"}, headers=admin_headers)
    assert listed.status_code == 200 and [k["key_id"] for k in listed.json()["keys"]] == [key_id]

    revoked = edge.delete(f"/admin/v1/keys/{key_id}", headers=admin_headers)
    assert revoked.status_code == 200 and revoked.json()["key"]["revoked"] is True
    refused = edge.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "invalid API key"
    assert edge.delete("/admin/v1/keys/key_000000000000", headers=admin_headers).status_code == 404

    budget = edge.put(
        "/admin/v1/tenants/rest-t/budget", headers=admin_headers, json={"monthly_limit_usd": 3.5}
    )
    assert budget.status_code == 200 and budget.json()["monthly_limit_usd"] == 3.5
    usage = edge.get("/admin/v1/tenants/rest-t/usage", params={"group_by": "day"}, headers=admin_headers)
    assert usage.status_code == 200 and usage.json()["total"]["requests"] == 0
    bad = edge.get("/admin/v1/tenants/rest-t/usage", params={"start_time": "soon"}, headers=admin_headers)
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("start_time:")
    # A valid tenant key is not an admin key: 403 saying so (a missing or unknown key is 401).
    assert edge.get("/admin/v1/keys", headers={"Authorization": f"Bearer {DEV_KEY}"}).status_code == 403
    assert edge.get("/admin/v1/keys", headers={"Authorization": "Bearer sk-nobody-0001"}).status_code == 401


async def test_listing_shows_stored_and_config_keys_without_secrets(admin):
    tenant = f"list-{uuid.uuid4().hex[:6]}"
    first = await create_key(admin, tenant, requests_per_minute=7)
    second = await create_key(admin, tenant, tokens_per_minute=900)

    listed = await admin.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id=tenant), metadata=ADMIN, timeout=10
    )
    oldest_first = sorted([first.key, second.key], key=lambda k: (k.created, k.key_id))
    assert [k.key_id for k in listed.keys] == [k.key_id for k in oldest_first]
    assert {(k.requests_per_minute, k.tokens_per_minute) for k in listed.keys} == {(7, 0), (0, 900)}

    everything = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=ADMIN, timeout=10)
    ids = [k.key_id for k in everything.keys]
    assert {"cfg-dev-dev", "cfg-dev-limited", first.key.key_id, second.key.key_id} <= set(ids)
    assert first.secret not in str(everything)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "no spaces"}, "tenant_id"),
        ({"tenant_id": "t" * 65}, "tenant_id"),
        ({"tenant_id": "acme", "name": "n" * 129}, "name"),
        ({"tenant_id": "acme", "requests_per_minute": -1}, "requests_per_minute"),
        ({"tenant_id": "acme", "tokens_per_minute": -5}, "tokens_per_minute"),
    ],
)
async def test_create_key_names_the_invalid_field(admin, request_fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(**request_fields), metadata=ADMIN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")


async def test_a_revoked_key_is_refused_by_every_replica_within_the_cache_ttl(stubs, admin):
    (gateway_a, _), (gateway_b, admin_b) = stubs
    created = await create_key(admin)
    # Both replicas now remember the key.
    assert await list_models_code(gateway_a, created.secret) == grpc.StatusCode.OK
    assert await list_models_code(gateway_b, created.secret) == grpc.StatusCode.OK

    revoked = await admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=created.key.key_id), metadata=ADMIN, timeout=10
    )
    revoked_at = time.monotonic()
    assert revoked.key.revoked and revoked.key.key_id == created.key.key_id
    # The replica that revoked it forgets it at once; the other within its cache TTL.
    assert await list_models_code(gateway_a, created.secret) == grpc.StatusCode.UNAUTHENTICATED
    while await list_models_code(gateway_b, created.secret) == grpc.StatusCode.OK:
        assert time.monotonic() - revoked_at < KEY_CACHE_SECONDS + 1.0, "replica B still accepts the key"
        await asyncio.sleep(0.05)
    assert await list_models_code(gateway_b, created.secret) == grpc.StatusCode.UNAUTHENTICATED

    listed = await admin_b.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="acme"), metadata=ADMIN, timeout=10
    )
    assert [k.revoked for k in listed.keys if k.key_id == created.key.key_id] == [True]


@pytest.mark.parametrize(
    ("key_id", "code"),
    [
        ("key_000000000000", grpc.StatusCode.NOT_FOUND),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("cfg-dev-dev", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_revoking_unknown_or_config_keys_is_refused(admin, key_id, code):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=ADMIN, timeout=10)
    assert caught.value.code() == code


async def test_admin_rpcs_refuse_every_key_but_the_admin_key(admin):
    created = await create_key(admin)
    calls = [
        (admin.CreateApiKey, admin_pb2.CreateApiKeyRequest(tenant_id="acme")),
        (admin.ListApiKeys, admin_pb2.ListApiKeysRequest()),
        (admin.RevokeApiKey, admin_pb2.RevokeApiKeyRequest(key_id=created.key.key_id)),
        (admin.SetBudget, admin_pb2.SetBudgetRequest(tenant_id="acme", monthly_limit_usd=1)),
        (admin.GetUsage, admin_pb2.GetUsageRequest(tenant_id="acme")),
    ]
    refusals = [
        (auth(DEV_KEY), grpc.StatusCode.PERMISSION_DENIED),  # tenant keys: valid, but not admin keys
        (auth(created.secret), grpc.StatusCode.PERMISSION_DENIED),
        (auth("sk-sophia-not-a-key-at-all"), grpc.StatusCode.UNAUTHENTICATED),
        ((), grpc.StatusCode.UNAUTHENTICATED),
    ]
    for method, request in calls:
        for metadata, code in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await method(request, metadata=metadata, timeout=10)
            assert caught.value.code() == code, (method, metadata)
    # The refused RevokeApiKey revoked nothing.
    listed = await admin.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="acme"), metadata=ADMIN, timeout=10
    )
    assert [k.revoked for k in listed.keys if k.key_id == created.key.key_id] == [False]


# --- rate limits -------------------------------------------------------------------------------------


def test_over_the_limit_the_edge_answers_429_with_retry_after(mesh, edge):
    wait_for_window_room(mesh, 10)
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = edge.post(
        "/admin/v1/keys", headers=admin_headers, json={"tenant_id": "acme", "requests_per_minute": 1}
    ).json()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {created['secret']}"}

    assert edge.post("/v1/chat/completions", headers=headers, json=body).status_code == 200
    refused = edge.post("/v1/chat/completions", headers=headers, json=body)
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert error["code"] == "RESOURCE_EXHAUSTED"
    assert (
        error["message"] == f"rate limit exceeded: 1 requests per minute for key {created['key']['key_id']}"
    )


async def test_the_request_limit_is_shared_exactly_by_two_gateway_replicas(mesh, stubs, admin):
    limit, per_replica = 5, 8
    wait_for_window_room(mesh, 10)
    created = await create_key(admin, requests_per_minute=limit)
    (gateway_a, _), (gateway_b, _) = stubs
    results = await asyncio.gather(
        *(
            chat_code(gateway, created.secret)
            for gateway in (gateway_a, gateway_b)
            for _ in range(per_replica)
        )
    )
    codes = [code for code, _, _ in results]
    assert codes.count(grpc.StatusCode.OK) == limit, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2 * per_replica - limit, codes
    for code, trailers, details in results:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert 1 <= int(trailers["retry-after"]) <= 60
            assert details == f"rate limit exceeded: {limit} requests per minute for key {created.key.key_id}"


async def test_model_listing_counts_against_the_request_limit(mesh, stubs, admin):
    wait_for_window_room(mesh, 10)
    created = await create_key(admin, requests_per_minute=1)
    (gateway, _), _ = stubs
    auth = (("authorization", f"Bearer {created.secret}"),)
    await gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_config_keys_are_rate_limited_too(mesh, stubs):
    wait_for_window_room(mesh, 10)
    gateway = stubs[0][0]
    codes = [(await chat_code(gateway, LIMITED_CONFIG_KEY))[0] for _ in range(3)]
    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ]


async def test_the_token_limit_refuses_once_used_tokens_are_charged_through_the_gateway(mesh, stubs, admin):
    wait_for_window_room(mesh, 10)
    created = await create_key(admin, tokens_per_minute=1)
    gateway = stubs[0][0]
    # An empty window admits the first request; its tokens are charged right after it answers.
    assert (await chat_code(gateway, created.secret))[0] == grpc.StatusCode.OK
    for _ in range(20):
        code, trailers, details = await chat_code(gateway, created.secret)
        if code != grpc.StatusCode.OK:
            break
        await asyncio.sleep(0.1)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == f"rate limit exceeded: 1 tokens per minute for key {created.key.key_id}"
    assert "retry-after" in trailers


@pytest.fixture
async def access(mesh):
    config = load_config(environ=mesh.environ)
    client = open_redis(config.redis.url, timeout_seconds=config.gateway.redis_timeout_seconds)
    access = AccessControl.over_redis(KeyRing(config.auth), client, key_cache_seconds=1)
    yield access
    await access.close()
    await client.aclose()


async def test_token_limit_counts_charged_tokens_and_the_estimate(mesh, access):
    wait_for_window_room(mesh, 10)
    key = Principal("acme", f"key_tpm_{uuid.uuid4().hex[:8]}", tokens_per_minute=100)
    access.charge(key, 95, await access.admit(key, 10))
    # 95 used + 10 estimated would pass 100.
    with pytest.raises(ResourceExhausted) as caught:
        await access.admit(key, 10)
    assert caught.value.message == f"rate limit exceeded: 100 tokens per minute for key {key.key_id}"
    assert dict(caught.value.trailers)["retry-after"].isdigit()
    access.charge(key, 5, await access.admit(key, 5))
    # The limit is reached: nothing more, however small.
    with pytest.raises(ResourceExhausted):
        await access.admit(key, 0)


async def test_an_empty_window_admits_a_request_estimated_above_the_whole_limit(mesh, access):
    wait_for_window_room(mesh, 10)
    key = Principal("acme", f"key_big_{uuid.uuid4().hex[:8]}", tokens_per_minute=50)
    access.charge(key, 1, await access.admit(key, 5000))
    with pytest.raises(ResourceExhausted):
        await access.admit(key, 5000)


async def test_refused_requests_do_not_use_up_the_window(mesh, access):
    wait_for_window_room(mesh, 10)
    key = Principal("acme", f"key_rpm_{uuid.uuid4().hex[:8]}", requests_per_minute=2)
    await access.admit(key, 0)
    await access.admit(key, 0)
    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            await access.admit(key, 0)
    with redis.Redis.from_url(mesh.config.redis.url, decode_responses=True) as client:
        (window,) = client.keys(f"gateway:ratelimit:{{{key.key_id}}}:*")
        assert client.hget(window, "requests") == "2"
        assert 60 < client.ttl(window) <= 120


# --- budgets and usage, forwarded to the ledger -----------------------------------------------------


async def test_budget_set_through_admin_reaches_the_ledger(mesh, admin):
    tenant = f"budget-{uuid.uuid4().hex[:6]}"
    reply = await admin.SetBudget(
        admin_pb2.SetBudgetRequest(
            tenant_id=tenant, monthly_limit_usd=12.34, alert_percentages=[50, 90], hard_stop=True
        ),
        metadata=ADMIN,
        timeout=10,
    )
    assert reply.tenant_id == tenant and reply.monthly_limit_usd == 12.34
    async with internal_channel(mesh, "ledger") as channel:
        status = await ledger_pb2_grpc.LedgerServiceStub(channel).CheckBudget(
            ledger_pb2.CheckBudgetRequest(tenant_id=tenant), timeout=10
        )
    assert status.limit_micros == 12_340_000 and status.allowed


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"tenant_id": "acme", "monthly_limit_usd": -1}, "monthly_limit_usd"),
        ({"tenant_id": "acme", "monthly_limit_usd": 5, "alert_percentages": [0]}, "alert_percentages[0]"),
        ({"tenant_id": "", "monthly_limit_usd": 5}, "tenant_id"),
    ],
)
async def test_invalid_budgets_name_the_field(admin, request_fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.SetBudget(admin_pb2.SetBudgetRequest(**request_fields), metadata=ADMIN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")


async def test_usage_through_admin_reports_the_tenants_chats(stubs, admin):
    tenant = f"usage-{uuid.uuid4().hex[:6]}"
    created = await create_key(admin, tenant)
    assert (await chat_code(stubs[0][0], created.secret))[0] == grpc.StatusCode.OK
    # Usage is recorded off the response path: wait for it.
    for _ in range(50):
        usage = await admin.GetUsage(admin_pb2.GetUsageRequest(tenant_id=tenant), metadata=ADMIN, timeout=10)
        if usage.total.requests:
            break
        await asyncio.sleep(0.1)
    assert usage.tenant_id == tenant
    assert [(row.key, row.requests, row.output_tokens) for row in usage.rows] == [(MODEL, 1, 1)]
    assert usage.total.requests == 1 and usage.total.input_tokens > 0
    assert usage.total.cost_usd == 0.0  # the local model has no price

    today = datetime.now(UTC).date()
    by_day = await admin.GetUsage(
        admin_pb2.GetUsageRequest(
            tenant_id=tenant,
            group_by="day",
            start_time=f"{today}T00:00:00Z",
            end_time=f"{today + timedelta(days=1)}T00:00:00+00:00",
        ),
        metadata=ADMIN,
        timeout=10,
    )
    assert [(row.key, row.requests) for row in by_day.rows] == [(str(today), 1)]
    yesterday = await admin.GetUsage(
        admin_pb2.GetUsageRequest(
            tenant_id=tenant,
            start_time=f"{today - timedelta(days=1)}T00:00:00Z",
            end_time=f"{today}T00:00:00Z",
        ),
        metadata=ADMIN,
        timeout=10,
    )
    assert not yesterday.rows and yesterday.total.requests == 0


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"start_time": "2025-01-01"}, "start_time"),
        ({"end_time": "tomorrow"}, "end_time"),
        ({"start_time": "2025-02-01T00:00:00Z", "end_time": "2025-01-01T00:00:00Z"}, "start_time"),
        ({"group_by": "week"}, "group_by"),
        ({"tenant_id": "a b"}, "tenant_id"),
    ],
)
async def test_invalid_usage_queries_name_the_field(admin, request_fields, field):
    request = admin_pb2.GetUsageRequest(**{"tenant_id": "acme", **request_fields})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetUsage(request, metadata=ADMIN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")


# --- outages (last: they stop processes of the shared mesh) -----------------------------------------


async def test_budget_and_usage_are_unavailable_while_the_ledger_is_down(mesh, admin):
    mesh.stop("ledger")
    for call in (
        admin.SetBudget(
            admin_pb2.SetBudgetRequest(tenant_id="acme", monthly_limit_usd=1), metadata=ADMIN, timeout=10
        ),
        admin.GetUsage(admin_pb2.GetUsageRequest(tenant_id="acme"), metadata=ADMIN, timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ledger is unavailable" in caught.value.details()


async def test_without_redis_config_keys_work_unlimited_and_stored_keys_are_unavailable(mesh, stubs, admin):
    created = await create_key(admin)  # created, never used: no replica remembers it
    mesh.stop("redis")
    gateway = stubs[0][0]
    assert await list_models_code(gateway, DEV_KEY) == grpc.StatusCode.OK
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(created.secret), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "key store unavailable"
    # Limits fail open: the key limited to 1 request a minute gets two through.
    codes = [(await chat_code(gateway, LIMITED_CONFIG_KEY))[0] for _ in range(2)]
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK]
