"""Backups of the durable state (tools/backup.py) against the session mesh's real Redis: taken while the
mesh serves, verified, restored after the state is wiped — reports, budgets and keys come back identical,
and a request retried with an old request id is still counted once."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import redis
from sophia.gateway.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from libs.config import REPO_ROOT
from tests.integration.conftest import ADMIN_KEY, DEV_KEY
from tests.support import internal_channel
from tools.backup import KEPT

ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)


def auth(key: str, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = [("authorization", f"Bearer {key}")]
    if request_id:
        metadata.append(("x-request-id", request_id))
    return tuple(metadata)


def chat(text: str) -> gateway_pb2.CreateChatCompletionRequest:
    params = gateway_pb2.ChatCompletionParams(
        model="auto", max_tokens=1, cache=False, messages=[gateway_pb2.ChatMessage(role="user", text=text)]
    )
    return gateway_pb2.CreateChatCompletionRequest(params=params)


def backup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.backup", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def wipe_kept_state(url: str) -> None:
    with redis.Redis.from_url(url) as client:
        for pattern in KEPT.values():
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)


class Load(threading.Thread):
    """Chats of another tenant, one after another, until stopped: the mesh keeps writing meanwhile."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self._address = address
        self.stop = threading.Event()
        self.running = threading.Event()  # set once chats are being answered
        self.answered = 0

    def run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
            while not self.stop.is_set():
                gateway.CreateChatCompletion(chat(f"load {uuid.uuid4()}"), metadata=auth(DEV_KEY), timeout=60)
                self.answered += 1
                self.running.set()


async def snapshot_of(mesh, admin, gateway_key_tenant: str) -> tuple:
    """What the tenant's operators see: usage by model and by day, the budget, the keys."""
    by_model = await admin.GetUsage(
        admin_pb2.GetUsageRequest(tenant_id=gateway_key_tenant), metadata=ADMIN, timeout=10
    )
    by_day = await admin.GetUsage(
        admin_pb2.GetUsageRequest(tenant_id=gateway_key_tenant, group_by="day"), metadata=ADMIN, timeout=10
    )
    keys = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=ADMIN, timeout=10)
    mine = sorted(
        (k.key_id, k.name, k.requests_per_minute, k.tokens_per_minute)
        for k in keys.keys
        if k.tenant_id == gateway_key_tenant
    )
    async with internal_channel(mesh, "ledger") as channel:
        budget = await ledger_pb2_grpc.LedgerServiceStub(channel).CheckBudget(
            ledger_pb2.CheckBudgetRequest(tenant_id=gateway_key_tenant), timeout=10
        )
    return (
        by_model.SerializeToString(deterministic=True),
        by_day.SerializeToString(deterministic=True),
        mine,
        (budget.limit_micros, budget.spent_micros),
    )


async def wait_for_requests(admin, tenant: str, count: int) -> None:
    for _ in range(100):
        usage = await admin.GetUsage(admin_pb2.GetUsageRequest(tenant_id=tenant), metadata=ADMIN, timeout=10)
        if usage.total.requests >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the ledger holds {usage.total.requests} of {count} requests")


async def test_a_backup_under_load_restores_reports_budgets_and_keys_identically(mesh, tmp_path: Path):
    url = mesh.config.redis.url
    tenant = f"backup-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        created = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant, name="backed-up", requests_per_minute=600),
            metadata=ADMIN,
            timeout=10,
        )
        await admin.SetBudget(
            admin_pb2.SetBudgetRequest(tenant_id=tenant, monthly_limit_usd=25, alert_percentages=[50, 90]),
            metadata=ADMIN,
            timeout=10,
        )
        retried_id = f"backup-retry-{uuid.uuid4().hex[:8]}"
        for i in range(3):
            await gateway.CreateChatCompletion(
                chat(f"question {i}"), metadata=auth(created.secret, f"{retried_id}-{i}"), timeout=60
            )
        await wait_for_requests(admin, tenant, 3)
        before = await snapshot_of(mesh, admin, tenant)

        load = Load(mesh.address("gateway"))
        load.start()
        try:
            assert await asyncio.to_thread(load.running.wait, 60)
            started_at = load.answered
            made = await asyncio.to_thread(backup, "create", str(tmp_path / "snap"), "--redis-url", url)
            # Give the load the time of one more chat, so it is seen serving across the backup.
            await asyncio.sleep(2.0)
        finally:
            load.stop.set()
            await asyncio.to_thread(load.join, 60)
        assert made.returncode == 0, made.stderr
        assert load.answered > started_at, "the mesh did not keep serving around the backup"
        verified = await asyncio.to_thread(backup, "verify", str(tmp_path / "snap"))
        assert verified.returncode == 0, verified.stderr

        await asyncio.to_thread(wipe_kept_state, url)
        gone = await admin.GetUsage(admin_pb2.GetUsageRequest(tenant_id=tenant), metadata=ADMIN, timeout=10)
        assert gone.total.requests == 0
        restored = await asyncio.to_thread(backup, "restore", str(tmp_path / "snap"), "--redis-url", url)
        assert restored.returncode == 0, restored.stderr

        assert await snapshot_of(mesh, admin, tenant) == before
        assert before[3][0] == 25_000_000  # the budget was part of what came back
        # The restored key still authenticates, and a retry of an answered request is not counted again.
        await asyncio.sleep(mesh.config.gateway.key_cache_seconds)
        await gateway.CreateChatCompletion(
            chat("question 0"), metadata=auth(created.secret, f"{retried_id}-0"), timeout=60
        )
        await asyncio.sleep(1.0)  # a second record, if any, would have reached the ledger by now
        assert await snapshot_of(mesh, admin, tenant) == before


def test_restore_refuses_a_redis_that_already_holds_state(mesh, tmp_path: Path):
    made = backup("create", str(tmp_path / "snap"), "--redis-url", mesh.config.redis.url)
    assert made.returncode == 0, made.stderr
    refused = backup("restore", str(tmp_path / "snap"), "--redis-url", mesh.config.redis.url)
    assert refused.returncode == 1 and "already holds" in refused.stderr


def test_verify_catches_a_changed_snapshot(mesh, tmp_path: Path):
    made = backup("create", str(tmp_path / "snap"), "--redis-url", mesh.config.redis.url)
    assert made.returncode == 0, made.stderr
    entries = tmp_path / "snap" / "entries.jsonl"
    entries.write_bytes(entries.read_bytes().replace(b'"ttl_ms":0', b'"ttl_ms":1', 1))
    broken = backup("verify", str(tmp_path / "snap"))
    assert broken.returncode == 1 and "checksum mismatch" in broken.stderr


async def test_no_secret_is_in_a_backup(mesh, tmp_path: Path):
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        created = await admin_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id="backup-secrets", name="canary"),
            metadata=ADMIN,
            timeout=10,
        )
        await gateway_pb2_grpc.GatewayServiceStub(channel).CreateChatCompletion(
            chat("canary"), metadata=auth(created.secret), timeout=60
        )
    made = await asyncio.to_thread(
        backup, "create", str(tmp_path / "snap"), "--redis-url", mesh.config.redis.url
    )
    assert made.returncode == 0, made.stderr
    files = [path.read_bytes() for path in (tmp_path / "snap").iterdir()]
    entries = (tmp_path / "snap" / "entries.jsonl").read_text().splitlines()
    payloads = [base64.b64decode(json.loads(line)["dump"]) for line in entries]
    assert any(b"backup-secrets" in payload for payload in payloads)  # the key's record is in there
    for secret in (created.secret, ADMIN_KEY, DEV_KEY):
        assert not any(secret.encode() in blob for blob in files + payloads), "a secret is in the backup"
