"""Governance against real processes: key rotation seen by a second Gateway replica, scoped keys, admin
roles, the audit log through the edge, and secrets that appear nowhere.

The mesh: Redis, CostLedger, ModelInference, two Gateway replicas sharing Redis, the edge in front of
the first. The Router and the cache are not started (the Gateway routes by its rules and bypasses the
cache); the admin actions that need them fail, and are audited as failed.
"""

from __future__ import annotations

import time
import uuid

import grpc
import httpx
import pytest
import redis
from sophia.gateway.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc

from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tests.support import free_port, free_port_block, mesh_environ
from tools.mesh import Mesh

ADMIN_KEY = "sk-governance-admin-canary-0001"
VIEWER_KEY = "sk-governance-viewer-canary-01"
OPERATOR_KEY = "sk-governance-operator-canary"
PROVIDER_KEY = "sk-provider-canary-4c1d9e7f2a"
KEY_CACHE_SECONDS = 1.0
CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    admin_keys = (
        f"[{{name: viewer, key: {VIEWER_KEY}, role: viewer, tenants: [acme]}}, "
        f"{{name: operator, key: {OPERATOR_KEY}, role: operator, tenants: [acme]}}]"
    )
    environ = mesh_environ(
        {
            "SOPHIA_ADMIN_KEY": ADMIN_KEY,
            "SOPHIA__AUTH__ADMIN_KEYS": admin_keys,
            "SOPHIA__GATEWAY__KEY_CACHE_SECONDS": str(KEY_CACHE_SECONDS),
            "SOPHIA__GATEWAY__OUTBOX_DIR": str(tmp_path_factory.mktemp("outbox-a")),
            # A provider whose key must never show: nothing listens at its address.
            "SOPHIA__PROVIDERS__CANARY": f"{{type: openai, base_url: 'http://127.0.0.1:{free_port()}/v1', "
            "api_key_env: GOVERNANCE_PROVIDER_KEY}",
            "SOPHIA__MODELS__CANARY-GPT": "{provider: canary, kind: chat}",
            "GOVERNANCE_PROVIDER_KEY": PROVIDER_KEY,
            "SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT": str(free_port_block(len(PROMETHEUS_PORT_OFFSETS))),
        }
    )
    first = Mesh(tmp_path_factory.mktemp("governance-a"), environ)
    second = Mesh(
        tmp_path_factory.mktemp("governance-b"),
        {
            **environ,
            "SOPHIA__SERVICES__GATEWAY__PORT": str(free_port()),
            "SOPHIA__GATEWAY__OUTBOX_DIR": str(tmp_path_factory.mktemp("outbox-b")),
            "SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT": "0",
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
def edge(replicas):
    with httpx.Client(base_url=replicas[0].edge_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def channels(replicas):
    opened = [grpc.insecure_channel(mesh.address("gateway")) for mesh in replicas]
    yield opened
    for channel in opened:
        channel.close()


def gateways(channels) -> list[gateway_pb2_grpc.GatewayServiceStub]:
    return [gateway_pb2_grpc.GatewayServiceStub(channel) for channel in channels]


def admin(channels) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(channels[0])


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def chat(model: str = CHAT_MODEL) -> gateway_pb2.CreateChatCompletionRequest:
    params = gateway_pb2.ChatCompletionParams(
        model=model, max_tokens=1, messages=[gateway_pb2.ChatMessage(role="user", text="Say hi.")]
    )
    return gateway_pb2.CreateChatCompletionRequest(params=params)


def code_of(call, request, key: str) -> grpc.StatusCode:
    try:
        call(request, metadata=auth(key), timeout=120)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def create_key(channels, tenant: str = "acme", **fields) -> admin_pb2.CreateApiKeyResponse:
    request = admin_pb2.CreateApiKeyRequest(tenant_id=tenant, name=f"t-{uuid.uuid4().hex[:6]}", **fields)
    return admin(channels).CreateApiKey(request, metadata=auth(ADMIN_KEY), timeout=10)


# --- rotation ---------------------------------------------------------------------------------------


def test_a_rotated_secret_works_on_another_replica_for_the_grace_period_then_stops(channels):
    first, second = gateways(channels)
    created = create_key(channels)
    old = created.secret
    models = gateway_pb2.ListModelsRequest()
    assert code_of(second.ListModels, models, old) == grpc.StatusCode.OK  # remembered by B now
    rotated = admin(channels).RotateApiKey(
        admin_pb2.RotateApiKeyRequest(key_id=created.key.key_id, grace_seconds=5),
        metadata=auth(ADMIN_KEY),
        timeout=10,
    )
    assert rotated.key.key_id == created.key.key_id and rotated.secret != old
    assert rotated.key.HasField("rotated_at") and rotated.HasField("old_secret_valid_until")
    # Both secrets work on both replicas during the grace period (checked quickly: it is 5 s long).
    for gateway in (first, second):
        assert code_of(gateway.ListModels, models, old) == grpc.StatusCode.OK
    for gateway in (first, second):
        assert code_of(gateway.ListModels, models, rotated.secret) == grpc.StatusCode.OK
    time.sleep(max(0.0, rotated.old_secret_valid_until.seconds + 0.5 - time.time()))
    for gateway in (first, second):
        assert code_of(gateway.ListModels, models, old) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(gateway.ListModels, models, rotated.secret) == grpc.StatusCode.OK
    assert code_of(first.CreateChatCompletion, chat(), rotated.secret) == grpc.StatusCode.OK


def test_listing_shows_created_rotated_expires_and_last_used(edge, channels):
    expires = int(time.time()) + 3600
    created = edge.post(
        "/admin/v1/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={
            "tenant_id": "listing",
            "name": "l",
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)),
        },
    )
    assert created.status_code == 200, created.text
    key_id = created.json()["key"]["key_id"]
    assert code_of(
        gateways(channels)[0].ListModels, gateway_pb2.ListModelsRequest(), created.json()["secret"]
    ) == (grpc.StatusCode.OK)
    edge.post(f"/admin/v1/keys/{key_id}:rotate", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={})
    listed = edge.get(
        "/admin/v1/keys", params={"tenant_id": "listing"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()["keys"]
    (key,) = listed
    assert key["expires_at"].startswith(time.strftime("%Y-%m-%dT%H", time.gmtime(expires)))
    assert "rotated_at" in key and key["created"] > 0
    # Last use is written once a minute per replica, or when the replica stops: the replica that served
    # the call still holds it in memory, and the listing includes it.
    assert "last_used_at" in key


# --- scopes -----------------------------------------------------------------------------------------


def test_a_key_scoped_to_embeddings_gets_403_naming_what_is_missing_on_chat(channels):
    first, _ = gateways(channels)
    created = create_key(channels, models=[EMBEDDING_MODEL], endpoints=[admin_pb2.KEY_ENDPOINT_EMBEDDINGS])
    embedded = first.CreateEmbeddings(
        gateway_pb2.CreateEmbeddingsRequest(model=EMBEDDING_MODEL, texts=["hi"]),
        metadata=auth(created.secret),
        timeout=60,
    )
    assert len(embedded.data[0].vector) == 384
    with pytest.raises(grpc.RpcError) as refused:
        first.CreateChatCompletion(chat(), metadata=auth(created.secret), timeout=60)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may call only embeddings; not chat" in refused.value.details()


def test_a_key_scoped_to_a_model_pattern_gets_403_on_another_model(edge, channels):
    created = create_key(channels, models=["smollm2-*"])
    assert code_of(gateways(channels)[0].CreateChatCompletion, chat(), created.secret) == grpc.StatusCode.OK
    refused = edge.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {created.secret}"},
        json={"model": "canary-gpt", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["type"] == "permission_error" and "may use only the models smollm2-*" in error["message"]


# --- roles ------------------------------------------------------------------------------------------


def test_a_viewer_reads_usage_but_cannot_create_keys(edge):
    viewer = {"Authorization": f"Bearer {VIEWER_KEY}"}
    assert edge.get("/admin/v1/tenants/acme/usage", headers=viewer).status_code == 200
    refused = edge.post("/admin/v1/keys", headers=viewer, json={"tenant_id": "acme"})
    assert refused.status_code == 403
    assert "role viewer; manage_keys needs admin or operator" in refused.json()["error"]["message"]
    elsewhere = edge.get("/admin/v1/tenants/globex/usage", headers=viewer)
    assert elsewhere.status_code == 403 and "scoped to tenants acme" in elsewhere.json()["error"]["message"]


def test_an_operator_manages_its_tenants_keys_only_and_no_admin_keys(edge):
    operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    assert edge.post("/admin/v1/keys", headers=operator, json={"tenant_id": "acme"}).status_code == 200
    assert edge.post("/admin/v1/keys", headers=operator, json={"tenant_id": "globex"}).status_code == 403
    promoted = edge.post("/admin/v1/keys", headers=operator, json={"role": "ADMIN_ROLE_ADMIN", "name": "me"})
    assert promoted.status_code == 403, promoted.text
    assert "manage_admin_keys needs admin" in promoted.json()["error"]["message"]


def test_an_admin_creates_a_viewer_key_that_cannot_touch_budgets(edge):
    made = edge.post(
        "/admin/v1/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"role": "ADMIN_ROLE_VIEWER", "name": "auditor"},
    )
    assert made.status_code == 200, made.text
    assert made.json()["key"]["role"] == "ADMIN_ROLE_VIEWER"
    viewer = {"Authorization": f"Bearer {made.json()['secret']}"}
    assert edge.get("/admin/v1/audit", headers=viewer).status_code == 200
    budget = edge.put("/admin/v1/tenants/acme/budget", headers=viewer, json={"monthly_limit_usd": 1})
    assert budget.status_code == 403


# --- the audit log ----------------------------------------------------------------------------------


def test_every_admin_action_is_audited_once_with_its_actor(edge, channels):
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    tenant = "acme"
    created = edge.post("/admin/v1/keys", headers=headers, json={"tenant_id": tenant, "name": "audited"})
    key_id = created.json()["key"]["key_id"]
    edge.post(f"/admin/v1/keys/{key_id}:rotate", headers=headers, json={"grace_seconds": 0})
    edge.delete(f"/admin/v1/keys/{key_id}", headers=headers)
    edge.put(f"/admin/v1/tenants/{tenant}/budget", headers=headers, json={"monthly_limit_usd": 5})
    edge.delete(f"/admin/v1/tenants/{tenant}/cache", headers=headers)  # the cache is down: failed
    edge.post("/admin/v1/keys", headers=headers, json={"tenant_id": "globex"})  # refused
    edge.get("/admin/v1/keys", headers={"Authorization": "Bearer sk-sophia-guessed-key-000000000"})

    entries = edge.get(
        "/admin/v1/audit",
        params={"actor": "cfg-admin-operator"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).json()["entries"]
    mine = [e for e in entries if e.get("target") == key_id or e.get("tenant_id") in (tenant, "globex")]
    seen = [(e["action"], e["outcome"]) for e in reversed(mine) if e["action"] != "read_audit"]
    assert ("create_key", "AUDIT_OUTCOME_OK") in seen
    assert seen.count(("rotate_key", "AUDIT_OUTCOME_OK")) == 1
    assert seen.count(("revoke_key", "AUDIT_OUTCOME_OK")) == 1
    assert seen.count(("set_budget", "AUDIT_OUTCOME_OK")) == 1
    assert seen.count(("invalidate_cache", "AUDIT_OUTCOME_FAILED")) == 1
    assert ("create_key", "AUDIT_OUTCOME_DENIED") in seen
    assert all(e["actor"] == "cfg-admin-operator" and e["role"] == "operator" for e in mine)

    guessed = edge.get(
        "/admin/v1/audit",
        params={"outcome": "AUDIT_OUTCOME_DENIED", "action": "list_keys"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).json()["entries"]
    assert guessed and guessed[0]["actor"].startswith("digest:")


def test_audit_pages_and_bad_queries(edge):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    first = edge.get("/admin/v1/audit", params={"page_size": 2}, headers=headers).json()
    assert len(first["entries"]) == 2 and first["next_page_token"]
    second = edge.get(
        "/admin/v1/audit", params={"page_size": 2, "page_token": first["next_page_token"]}, headers=headers
    ).json()
    assert second["entries"][0]["id"] < first["entries"][-1]["id"]
    bad = edge.get("/admin/v1/audit", params={"page_size": 900}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "page_size"


# --- secrets hygiene (last: reads what everything above wrote) --------------------------------------


def test_no_secret_appears_in_logs_audit_errors_or_metrics(replicas, edge, channels):
    tenant_secret = create_key(channels).secret
    # The canary provider is unreachable: its key is used, and the error comes back to the client.
    failed = edge.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {tenant_secret}"},
        json={"model": "canary-gpt", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert failed.status_code >= 400
    bodies = [failed.text]
    for wrong in (ADMIN_KEY + "x", tenant_secret + "x"):
        bodies.append(edge.get("/admin/v1/keys", headers={"Authorization": f"Bearer {wrong}"}).text)
        bodies.append(edge.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"}).text)
    mesh = replicas[0]
    logs = "\n".join(path.read_text(errors="replace") for path in mesh.log_dir.glob("*.log"))
    with redis.Redis.from_url(mesh.config.redis.url, decode_responses=True) as client:
        audit = repr(client.xrange("gateway:audit:log"))
    base = mesh.config.telemetry.prometheus_base_port
    metrics = "".join(httpx.get(f"http://127.0.0.1:{base + offset}/metrics").text for offset in (0, 3, 4))
    for secret in (ADMIN_KEY, VIEWER_KEY, OPERATOR_KEY, PROVIDER_KEY, tenant_secret):
        for where, text in (
            ("logs", logs),
            ("audit log", audit),
            ("metrics", metrics),
            ("bodies", "".join(bodies)),
        ):
            assert secret not in text, f"a secret is in the {where}"
