"""Usage is durable before the answer: a Gateway killed (-9) under load while the ledger is down or hung
loses no record of an answered request and doubles none, once it and the ledger are back."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from dataclasses import dataclass, field

import httpx
import pytest
import redis

from tests.integration.pipeline_mesh import DEV_KEY, start_pipeline_mesh, stop_pipeline_mesh

WORKERS = 6


@pytest.fixture
def pipeline(tmp_path):
    running = start_pipeline_mesh(tmp_path)
    try:
        yield running
    finally:
        stop_pipeline_mesh(running)


@dataclass
class Load:
    """Requests fired until `stop` is set; each carries its own x-request-id."""

    answered: dict[str, tuple[int, int]] = field(default_factory=dict)  # id → (prompt, completion tokens)
    attempted: set[str] = field(default_factory=set)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            request_id = f"wal-{uuid.uuid4().hex}"
            self.attempted.add(request_id)
            body = {"model": "good-gpt", "messages": [{"role": "user", "content": f"count {request_id}"}]}
            try:
                reply = await client.post(
                    "/v1/chat/completions",
                    json={**body, "max_tokens": 8, "cache": False},
                    headers={"x-request-id": request_id},
                )
            except httpx.TransportError:
                await asyncio.sleep(0.05)
                continue
            if reply.status_code == 200:
                usage = reply.json()["usage"]
                self.answered[request_id] = (usage["prompt_tokens"], usage["completion_tokens"])
            else:
                await asyncio.sleep(0.05)  # the Gateway is gone: the edge answers 503 at once


def ledger_records(pipeline, tenant: str = "dev") -> dict[str, tuple[int, int]]:
    """request id → (input, output tokens) of every record the ledger holds for the tenant."""
    client = redis.Redis(port=pipeline.mesh.redis_port, decode_responses=True)
    try:
        prefix = "ledger:{" + tenant + "}:usage:"
        records = {}
        for key in client.scan_iter(match=prefix + "*", count=1000):
            fields = client.hmget(key, "input_tokens", "output_tokens")
            records[key.removeprefix(prefix)] = (int(fields[0]), int(fields[1]))
        return records
    finally:
        client.close()


async def kill_the_gateway_under_load(pipeline, ledger_trouble) -> Load:
    load = Load()
    async with httpx.AsyncClient(
        base_url=pipeline.edge, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=30
    ) as client:
        workers = asyncio.gather(*(load.worker(client) for _ in range(WORKERS)))
        await asyncio.sleep(0.5)
        await ledger_trouble()
        await asyncio.sleep(2.0)  # answers keep coming, their records wait in the journal
        answered_before_kill = len(load.answered)
        gateway = pipeline.mesh.processes.pop("gateway")
        gateway.kill()  # kill -9: no drain, no goodbye
        await asyncio.to_thread(gateway.wait)
        load.stop.set()
        await workers
    assert answered_before_kill > 10, "too little load reached the Gateway before it was killed"
    return load


async def wait_for_the_ledger_to_hold(pipeline, load: Load) -> dict[str, tuple[int, int]]:
    records: dict[str, tuple[int, int]] = {}
    for _ in range(120):
        records = ledger_records(pipeline)
        if set(load.answered) <= set(records):
            break
        await asyncio.sleep(0.25)
    return records


def assert_every_answer_counted_once(load: Load, records: dict[str, tuple[int, int]]) -> None:
    ours = {request_id: tokens for request_id, tokens in records.items() if request_id.startswith("wal-")}
    lost = set(load.answered) - set(ours)
    assert not lost, f"{len(lost)} of {len(load.answered)} answered requests are missing from the ledger"
    # Each request id is one record in the ledger; a record beyond the answered ones can only be a request
    # the kill cut off after its record was durable (its provider call happened, so it is billed).
    assert set(ours) <= load.attempted
    unanswered = set(ours) - set(load.answered)
    assert len(unanswered) <= WORKERS
    answered_tokens = [sum(t[0] for t in load.answered.values()), sum(t[1] for t in load.answered.values())]
    recorded_tokens = [sum(ours[r][0] for r in load.answered), sum(ours[r][1] for r in load.answered)]
    assert recorded_tokens == answered_tokens


async def test_a_gateway_killed_while_the_ledger_is_down_loses_no_usage(pipeline):
    async def ledger_down() -> None:
        ledger = pipeline.mesh.processes.pop("ledger")
        ledger.kill()
        await asyncio.to_thread(ledger.wait)

    load = await kill_the_gateway_under_load(pipeline, ledger_down)
    pipeline.mesh.start("gateway")  # the same config: the same outbox journal
    await asyncio.to_thread(pipeline.mesh.wait_ready, ["gateway"], 60)
    pipeline.mesh.start("ledger")
    await asyncio.to_thread(pipeline.mesh.wait_ready, ["ledger"], 60)
    assert_every_answer_counted_once(load, await wait_for_the_ledger_to_hold(pipeline, load))
    log = pipeline.mesh.log_path("gateway").read_text()
    assert "wait for the ledger" in log  # the restarted Gateway took up the journal


async def test_a_gateway_killed_while_the_ledger_hangs_loses_no_usage(pipeline):
    ledger = pipeline.mesh.processes["ledger"]

    async def ledger_hangs() -> None:
        os.kill(ledger.pid, signal.SIGSTOP)

    try:
        load = await kill_the_gateway_under_load(pipeline, ledger_hangs)
        pipeline.mesh.start("gateway")
        await asyncio.to_thread(pipeline.mesh.wait_ready, ["gateway"], 60)
    finally:
        os.kill(ledger.pid, signal.SIGCONT)
    assert_every_answer_counted_once(load, await wait_for_the_ledger_to_hold(pipeline, load))


async def test_calls_alone_in_flight_are_billed_their_own_counts_after_a_kill_and_failed_ones_nothing(
    pipeline,
):
    """One request at a time, each call is on disk as its stand-in (the prompt's estimate) before its
    provider answers, and its own record is written over it without a sync of its own: a Gateway killed
    (-9) right after an answer loses nothing written, so once back every answer is billed its own counts,
    and a call no provider answered (its stand-in withdrawn) nothing."""
    ledger = pipeline.mesh.processes.pop("ledger")
    ledger.kill()  # nothing delivered before the kill: every record comes back from the journal
    await asyncio.to_thread(ledger.wait)
    run = uuid.uuid4().hex
    answered: dict[str, tuple[int, int]] = {}
    async with httpx.AsyncClient(
        base_url=pipeline.edge, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=30
    ) as client:

        async def ask(request_id: str, content: str) -> httpx.Response:
            body = {"model": "good-gpt", "messages": [{"role": "user", "content": content}], "cache": False}
            return await client.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id})

        failed = await ask(f"alone-failed-{run}", "fault=status:500 count to three")
        assert failed.status_code != 200
        for i in range(5):
            request_id = f"alone-{run}-{i}"
            reply = await ask(request_id, f"count {request_id} " + "word " * (i * 40))
            assert reply.status_code == 200
            usage = reply.json()["usage"]
            answered[request_id] = (usage["prompt_tokens"], usage["completion_tokens"])
    gateway = pipeline.mesh.processes.pop("gateway")
    gateway.kill()
    await asyncio.to_thread(gateway.wait)
    pipeline.mesh.start("gateway")  # the same outbox journal
    await asyncio.to_thread(pipeline.mesh.wait_ready, ["gateway"], 60)
    pipeline.mesh.start("ledger")
    await asyncio.to_thread(pipeline.mesh.wait_ready, ["ledger"], 60)
    records: dict[str, tuple[int, int]] = {}
    for _ in range(120):
        records = ledger_records(pipeline)
        if set(answered) <= set(records):
            break
        await asyncio.sleep(0.25)
    assert {request_id: records.get(request_id) for request_id in answered} == answered
    assert f"alone-failed-{run}" not in records


async def test_a_gateway_killed_mid_stream_still_bills_the_stream(pipeline):
    """A stream's stand-in record is on disk before its first chunk goes out: a Gateway killed while it
    streams bills, once back, the prompt and what had been delivered by then."""
    request_id = f"killed-stream-{uuid.uuid4().hex}"
    content = "fault=chunk_latency:0.4 " + " ".join(f"word{i}" for i in range(40))
    body = {"model": "good-gpt", "messages": [{"role": "user", "content": content}], "stream": True}

    def read_the_first_chunk_then_kill_the_gateway() -> None:
        headers = {"Authorization": f"Bearer {DEV_KEY}", "x-request-id": request_id}
        with httpx.Client(base_url=pipeline.edge, headers=headers, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json={**body, "cache": False}) as response:
                assert response.status_code == 200
                assert any(line.startswith("data: {") for line in response.iter_lines())
                gateway = pipeline.mesh.processes.pop("gateway")
                gateway.kill()  # kill -9 while the provider still streams
                gateway.wait()

    await asyncio.to_thread(read_the_first_chunk_then_kill_the_gateway)
    pipeline.mesh.start("gateway")  # the same outbox journal
    await asyncio.to_thread(pipeline.mesh.wait_ready, ["gateway"], 60)
    for _ in range(120):
        records = ledger_records(pipeline)
        if request_id in records:
            break
        await asyncio.sleep(0.25)
    assert request_id in records, "the killed stream was never billed"
    input_tokens, _output_tokens = records[request_id]
    assert input_tokens >= len(content) // 3  # the prompt, estimated as a cut stream's is
