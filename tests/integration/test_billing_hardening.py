"""The bill cannot be dodged: streams cut off by the client, refused embeddings, reused request ids.

Each test bills a tenant of its own (a key made through the admin API), so the ledger's report for that
tenant holds exactly what the test caused.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import httpx
import pytest
import redis
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from tests.integration.pipeline_mesh import ADMIN_KEY, start_pipeline_mesh, stop_pipeline_mesh
from tests.support import internal_channel

# Prices of the pipeline mesh, micro-dollars per token: (input, output).
PRICES = {"good-gpt": (1.0, 2.0), "good-claude": (3.0, 15.0), "smollm2-135m-instruct": (0.0, 0.0)}
LONG_PROMPT = " ".join(f"word{i}" for i in range(40))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    running = start_pipeline_mesh(tmp_path_factory.mktemp("billing"))
    try:
        running.mesh.start("inference")  # the local model, for its exact token counts
        running.mesh.wait_ready(["inference"], 240)
        yield running
    finally:
        stop_pipeline_mesh(running)


def new_tenant_key(pipeline, *, tokens_per_minute: int = 10_000_000) -> tuple[str, str, str]:
    """(tenant id, key id, secret) of a fresh tenant with a tokens-per-minute limit."""
    tenant = f"bill-{uuid.uuid4().hex[:12]}"
    reply = httpx.post(
        f"{pipeline.edge}/admin/v1/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"tenant_id": tenant, "name": "metered", "tokens_per_minute": tokens_per_minute},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    key = body["key"]
    return tenant, key.get("key_id") or key["keyId"], body["secret"]


async def usage_report(pipeline, tenant: str) -> ledger_pb2.GetUsageReportResponse:
    async with internal_channel(pipeline.mesh, "ledger") as channel:
        return await ledger_pb2_grpc.LedgerServiceStub(channel).GetUsageReport(
            ledger_pb2.GetUsageReportRequest(tenant_id=tenant, group_by=ledger_pb2.GROUP_BY_MODEL), timeout=10
        )


async def wait_for_requests(pipeline, tenant: str, requests: int) -> ledger_pb2.GetUsageReportResponse:
    for _ in range(60):
        report = await usage_report(pipeline, tenant)
        if report.total.requests >= requests:
            return report
        await asyncio.sleep(0.25)
    return report


def charged_tokens(pipeline, key_id: str) -> int:
    """The tokens charged to the key's tokens-per-minute windows in Redis."""
    client = redis.Redis(port=pipeline.mesh.redis_port, decode_responses=True)
    try:
        windows = client.keys("gateway:ratelimit:{" + key_id + "}:*")
        return sum(int(client.hget(window, "tokens") or 0) for window in windows)
    finally:
        client.close()


def read_a_few_chunks_then_leave(pipeline, secret: str, model: str, content: str, **extra) -> str:
    """Streams a chat through the edge, reads three content chunks and drops the connection."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True, **extra}
    received = []
    with httpx.Client(base_url=pipeline.edge, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
                text = (choices[0].get("delta") or {}).get("content")
                if text:
                    received.append(text)
                if len(received) == 3:
                    break
    assert len(received) == 3, "the stream ended before three chunks"
    return "".join(received)


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("good-gpt", {}),
        ("good-claude", {}),
        ("smollm2-135m-instruct", {"max_tokens": 200, "temperature": 0.7}),
    ],
)
async def test_a_stream_the_client_leaves_early_is_billed_for_what_it_delivered(pipeline, model, extra):
    tenant, key_id, secret = new_tenant_key(pipeline)
    # The fake providers pause between events, so the client leaves long before the final usage event.
    fake = model.startswith("good")
    content = f"fault=chunk_latency:0.4 {LONG_PROMPT}" if fake else "Tell me a long story."
    await asyncio.to_thread(read_a_few_chunks_then_leave, pipeline, secret, model, content, **extra)
    report = await wait_for_requests(pipeline, tenant, 1)
    assert report.total.requests == 1
    (row,) = report.rows
    assert row.key == model
    assert row.input_tokens > 0
    assert row.output_tokens > 0
    input_price, output_price = PRICES[model]
    assert row.cost_micros == round(row.input_tokens * input_price + row.output_tokens * output_price)
    for _ in range(20):  # the charge lands just after the record
        if charged_tokens(pipeline, key_id) == row.input_tokens + row.output_tokens:
            break
        await asyncio.sleep(0.1)
    assert charged_tokens(pipeline, key_id) == row.input_tokens + row.output_tokens


async def test_a_cut_streams_prompt_estimate_counts_what_is_sent_beside_the_messages(pipeline):
    tenant, _key_id, secret = new_tenant_key(pipeline)
    schema = {"type": "object", "description": "d" * 6_000, "properties": {"answer": {"type": "string"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    content = f"fault=chunk_latency:0.4 {LONG_PROMPT}"
    await asyncio.to_thread(
        read_a_few_chunks_then_leave, pipeline, secret, "good-gpt", content, response_format=response_format
    )
    report = await wait_for_requests(pipeline, tenant, 1)
    # The schema reaches the model as prompt: billed as its JSON (about 3 characters a token) on top.
    assert report.total.input_tokens >= (len(content) + len(json.dumps(response_format))) // 3


async def test_embeddings_with_dimensions_the_model_cannot_honour_are_refused_unbilled(pipeline):
    tenant, _, secret = new_tenant_key(pipeline)
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(base_url=pipeline.edge, headers=headers, timeout=60) as client:
        refused = await client.post(
            "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello", "dimensions": 100}
        )
        assert refused.status_code == 400, refused.text
        assert "dimensions" in refused.json()["error"]["message"]
        assert "384" in refused.json()["error"]["message"]
        native = await client.post(
            "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello", "dimensions": 384}
        )
        assert native.status_code == 200, native.text
        assert len(native.json()["data"][0]["embedding"]) == 384
        # A model whose provider takes `dimensions` gets it passed on.
        shortened = await client.post(
            "/v1/embeddings", json={"model": "good-embedding", "input": "hello", "dimensions": 64}
        )
        assert shortened.status_code == 200, shortened.text
        assert len(shortened.json()["data"][0]["embedding"]) == 64
    report = await wait_for_requests(pipeline, tenant, 2)
    await asyncio.sleep(0.5)  # a record of the refused request would have landed by now
    report = await usage_report(pipeline, tenant)
    assert report.total.requests == 2
    assert sorted(row.key for row in report.rows) == ["all-minilm-l6-v2", "good-embedding"]


async def test_the_ledger_binds_a_request_id_to_its_record(pipeline):
    tenant, _, _ = new_tenant_key(pipeline)
    record = ledger_pb2.RecordUsageRequest(
        request_id="bound-id", tenant_id=tenant, model_id="good-gpt", input_tokens=10, output_tokens=5
    )
    other = ledger_pb2.RecordUsageRequest()
    other.CopyFrom(record)
    other.input_tokens = 11
    async with internal_channel(pipeline.mesh, "ledger") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        assert not (await stub.RecordUsage(record, timeout=10)).duplicate
        assert (await stub.RecordUsage(record, timeout=10)).duplicate  # a retry: counted once
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.RecordUsage(other, timeout=10)  # another request under the same id: never merged
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "request_id" in raised.value.details()
    report = await usage_report(pipeline, tenant)
    assert (report.total.requests, report.total.input_tokens) == (1, 10)


async def test_usage_under_a_request_id_the_ledger_holds_for_other_usage_is_still_counted(pipeline):
    tenant, _, secret = new_tenant_key(pipeline)
    async with internal_channel(pipeline.mesh, "ledger") as channel:
        await ledger_pb2_grpc.LedgerServiceStub(channel).RecordUsage(
            ledger_pb2.RecordUsageRequest(
                request_id="taken-id", tenant_id=tenant, model_id="good-gpt", input_tokens=1, output_tokens=1
            ),
            timeout=10,
        )
    async with httpx.AsyncClient(base_url=pipeline.edge, timeout=60) as client:
        reply = await client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {secret}", "x-request-id": "taken-id"},
            json={"model": "good-gpt", "messages": [{"role": "user", "content": "count me"}], "cache": False},
        )
    assert reply.status_code == 200, reply.text
    report = await wait_for_requests(pipeline, tenant, 2)
    assert report.total.requests == 2
    assert report.total.output_tokens == 1 + reply.json()["usage"]["completion_tokens"]


def post_chat(pipeline, secret: str, request_id: str, content: str, **extra) -> httpx.Response:
    body = {"model": "good-gpt", "messages": [{"role": "user", "content": content}], "cache": False, **extra}
    return httpx.post(
        f"{pipeline.edge}/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}", "x-request-id": request_id},
        json=body,
        timeout=60,
    )


async def test_one_request_id_never_bills_many_requests_once(pipeline):
    tenant, _, secret = new_tenant_key(pipeline)
    prompts = [f"prompt number {i}" for i in range(20)]
    replies = [await asyncio.to_thread(post_chat, pipeline, secret, "shared-id", p) for p in prompts]
    assert replies[0].status_code == 200, replies[0].text
    for refused in replies[1:]:
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "ALREADY_EXISTS"
        assert "x-request-id" in refused.json()["error"]["message"]
    await asyncio.sleep(0.5)
    assert (await usage_report(pipeline, tenant)).total.requests == 1


async def test_a_retry_gets_the_first_answer_and_is_counted_once(pipeline):
    tenant, key_id, secret = new_tenant_key(pipeline)
    first = await asyncio.to_thread(post_chat, pipeline, secret, "retry-id", "say this once")
    retry = await asyncio.to_thread(post_chat, pipeline, secret, "retry-id", "say this once")
    assert first.status_code == retry.status_code == 200
    assert retry.json()["choices"] == first.json()["choices"]
    assert retry.json()["usage"] == first.json()["usage"]
    report = await wait_for_requests(pipeline, tenant, 1)
    await asyncio.sleep(0.5)
    report = await usage_report(pipeline, tenant)
    assert report.total.requests == 1
    usage = first.json()["usage"]
    assert charged_tokens(pipeline, key_id) == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_a_retry_while_the_first_attempt_runs_is_told_to_wait(pipeline):
    tenant, _, secret = new_tenant_key(pipeline)
    content = "fault=latency:2 slow answer"
    first = asyncio.create_task(asyncio.to_thread(post_chat, pipeline, secret, "slow-id", content))
    await asyncio.sleep(0.8)
    early = await asyncio.to_thread(post_chat, pipeline, secret, "slow-id", content)
    assert early.status_code == 409, early.text
    assert early.json()["error"]["code"] == "ABORTED"
    assert (await first).status_code == 200
    late = await asyncio.to_thread(post_chat, pipeline, secret, "slow-id", content)
    assert late.status_code == 200
    assert late.json()["choices"] == (await first).json()["choices"]
    await asyncio.sleep(0.5)
    assert (await usage_report(pipeline, tenant)).total.requests == 1


async def test_a_failed_first_attempt_frees_its_request_id(pipeline):
    _, _, secret = new_tenant_key(pipeline)
    for _ in range(2):  # the retry runs (and fails) again instead of being told to wait
        reply = await asyncio.to_thread(post_chat, pipeline, secret, "failing-id", "hi", model="fail400-gpt")
        assert reply.status_code == 400, reply.text


async def test_a_retried_stream_is_replayed_from_the_stored_answer(pipeline):
    tenant, _, secret = new_tenant_key(pipeline)
    body = {"model": "good-gpt", "messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True}
    texts = []
    for _ in range(2):
        text = []
        async with httpx.AsyncClient(base_url=pipeline.edge, timeout=60) as client:
            headers = {"Authorization": f"Bearer {secret}", "x-request-id": "stream-id"}
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply:
                assert reply.status_code == 200
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
                        text.append((choices[0].get("delta") or {}).get("content") or "")
        texts.append("".join(text))
    assert texts[0] == texts[1] == LONG_PROMPT
    await asyncio.sleep(0.5)
    assert (await usage_report(pipeline, tenant)).total.requests == 1
