"""Chaos: kill -9 each service and Redis under load; the ledger then holds exactly the answered requests.

Clients behave like an SDK with idempotency keys: every logical request has its own x-request-id and is
retried with the same id and body until it succeeds. Meanwhile the Router, the cache, the ledger, Redis
and the Gateway are each killed with SIGKILL and started again, one after the other. Afterwards the
ledger must hold one record per request id — none lost, none doubled — with exactly the tokens the
clients were told they used.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from tests.integration.pipeline_mesh import DEV_KEY, start_pipeline_mesh, stop_pipeline_mesh
from tests.support import internal_channel

CONCURRENCY = 6
RETRY_FOR_SECONDS = 120
VICTIMS = ("router", "cache", "ledger", "redis", "gateway")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    running = start_pipeline_mesh(tmp_path_factory.mktemp("chaos"))
    try:
        yield running
    finally:
        stop_pipeline_mesh(running)


async def _one_request(client: httpx.AsyncClient, n: int, answered: dict[str, dict]) -> None:
    request_id = f"chaos-{n:04d}"
    body = {
        "model": "good-gpt",
        "messages": [{"role": "user", "content": f"chaos request number {n} " + "word " * (n % 7)}],
        "max_tokens": 16,
        "cache": False,
    }
    give_up = time.monotonic() + RETRY_FOR_SECONDS
    while time.monotonic() < give_up:
        try:
            reply = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id})
        except httpx.TransportError:
            reply = None
        if reply is not None and reply.status_code == 200:
            answered[request_id] = reply.json()["usage"]
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{request_id} never succeeded")


async def _load(edge: str, answered: dict[str, dict], stop: asyncio.Event) -> int:
    """Sends requests until `stop` is set; returns how many logical requests were started."""
    counter = iter(range(1_000_000))
    started = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal started
        while not stop.is_set():
            started += 1
            await _one_request(client, next(counter), answered)
            await asyncio.sleep(0.05)  # a modest load, not a flood

    headers = {"Authorization": f"Bearer {DEV_KEY}"}
    async with httpx.AsyncClient(base_url=edge, headers=headers, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return started


async def _chaos(pipeline) -> None:
    mesh = pipeline.mesh
    for victim in VICTIMS:
        await asyncio.sleep(1.5)
        process = mesh.processes.pop(victim)
        process.send_signal(signal.SIGKILL)
        process.wait()
        await asyncio.sleep(1.0)
        mesh.start(victim)
        await asyncio.to_thread(mesh.wait_ready, [victim], 120)
    await asyncio.sleep(1.5)


async def _ledger_totals(pipeline) -> ledger_pb2.UsageRow:
    async with internal_channel(pipeline.mesh, "ledger") as channel:
        report = await ledger_pb2_grpc.LedgerServiceStub(channel).GetUsageReport(
            ledger_pb2.GetUsageReportRequest(tenant_id="dev", group_by=ledger_pb2.GROUP_BY_MODEL), timeout=10
        )
    return report.total


async def test_kill_9_of_each_service_and_redis_loses_and_doubles_no_usage(pipeline):
    before = await _ledger_totals(pipeline)
    answered: dict[str, dict] = {}
    stop = asyncio.Event()
    load = asyncio.create_task(_load(pipeline.edge, answered, stop))
    await _chaos(pipeline)
    stop.set()
    started = await load
    assert started >= 50, f"only {started} requests ran during the chaos"
    assert len(answered) == started

    expected_input = sum(usage["prompt_tokens"] for usage in answered.values())
    expected_output = sum(usage["completion_tokens"] for usage in answered.values())
    # Records spooled while the ledger or Redis was down are replayed in the background.
    deadline = time.monotonic() + 60
    while True:
        total = await _ledger_totals(pipeline)
        recorded = total.requests - before.requests
        if recorded >= started or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert recorded == started, f"{recorded} usage records for {started} answered requests"
    assert total.input_tokens - before.input_tokens == expected_input
    assert total.output_tokens - before.output_tokens == expected_output
    # Nothing more arrives later either (a late replay would double a record).
    await asyncio.sleep(2)
    assert (await _ledger_totals(pipeline)).requests - before.requests == started
