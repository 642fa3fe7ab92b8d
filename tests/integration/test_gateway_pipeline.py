"""The Gateway pipeline against fake providers: fallback, deadlines, streaming, usage, cache, secrets."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import httpx
import openai
import pytest
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from tests.integration.pipeline_mesh import (
    BUDGET_KEY,
    CANARY_KEY,
    DEV_KEY,
    SCOPED_KEY,
    start_pipeline_mesh,
    stop_pipeline_mesh,
)
from tests.support import internal_channel

HELLO = [{"role": "user", "content": "hello from the pipeline test"}]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    running = start_pipeline_mesh(tmp_path_factory.mktemp("pipeline"))
    try:
        yield running
    finally:
        stop_pipeline_mesh(running)


@pytest.fixture(scope="module")
def edge(pipeline):
    with httpx.Client(
        base_url=pipeline.edge, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=60
    ) as client:
        yield client


def chat(edge: httpx.Client, model: str, *, headers=None, **extra) -> httpx.Response:
    body = {"model": model, "messages": extra.pop("messages", HELLO), "max_tokens": 16, **extra}
    return edge.post("/v1/chat/completions", json=body, headers=headers or {})


async def usage_report(pipeline, tenant: str) -> ledger_pb2.GetUsageReportResponse:
    async with internal_channel(pipeline.mesh, "ledger") as channel:
        return await ledger_pb2_grpc.LedgerServiceStub(channel).GetUsageReport(
            ledger_pb2.GetUsageReportRequest(tenant_id=tenant, group_by=ledger_pb2.GROUP_BY_MODEL), timeout=10
        )


@pytest.mark.parametrize("failing", ["fail500-gpt", "fail429-gpt", "hang-gpt", "drop-gpt"])
def test_retryable_failures_fall_back_to_the_next_target(edge, failing):
    reply = chat(edge, failing, cache=False)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sophia-model"] == "good-gpt"
    assert reply.headers["x-sophia-provider"] == "good"
    assert reply.headers["x-sophia-attempts"] == "2"
    assert reply.json()["choices"][0]["message"]["content"] == HELLO[0]["content"]


def test_a_fallback_outside_the_keys_models_is_not_tried(edge):
    reply = chat(edge, "fail500-gpt", cache=False, headers={"Authorization": f"Bearer {SCOPED_KEY}"})
    assert reply.status_code != 200, reply.headers.get("x-sophia-model")
    assert reply.json()["error"]["code"] == "UNAVAILABLE", reply.text  # the only allowed model failed
    assert chat(edge, "fail500-gpt", cache=False).headers["x-sophia-model"] == "good-gpt"  # others may


def test_a_stream_falls_back_before_its_first_token(pipeline):
    client = openai.OpenAI(base_url=f"{pipeline.edge}/v1", api_key=DEV_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="fail500-gpt", messages=HELLO, stream=True)
    assert raw.headers["x-sophia-model"] == "good-gpt"
    assert raw.headers["x-sophia-attempts"] == "2"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == HELLO[0]["content"]


def test_a_provider_body_past_the_limit_fails_the_call_and_the_gateway_goes_on(edge):
    """A gzip body that expands to 128 MiB of zeros: refused at 64 MiB instead of held whole."""
    reply = chat(edge, "good-gpt", messages=[{"role": "user", "content": "fault=gzip_bomb"}], cache=False)
    assert reply.status_code == 503, reply.text
    assert "malformed response (body larger than 64 MiB)" in reply.json()["error"]["message"]
    assert chat(edge, "good-gpt", cache=False).status_code == 200


def test_a_bad_request_is_not_retried_elsewhere(edge):
    reply = chat(edge, "fail400-gpt", cache=False)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_hanging_provider_ends_in_504_within_the_callers_deadline(edge):
    started = time.monotonic()
    reply = chat(edge, "hang-only", cache=False, headers={"grpc-timeout": "1500m"})
    elapsed = time.monotonic() - started
    assert reply.status_code == 504, reply.text
    assert elapsed < 1.5 + 1.0


async def test_hanging_provider_over_grpc_is_deadline_exceeded(pipeline):
    from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    request = gateway_pb2.CreateChatCompletionRequest()
    request.params.model = "hang-only"
    request.params.messages.add(role="user").content.string_value = "hi"
    async with grpc.aio.insecure_channel(pipeline.mesh.address("gateway")) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gateway_pb2_grpc.GatewayServiceStub(channel).CreateChatCompletion(
                request, metadata=(("authorization", f"Bearer {DEV_KEY}"),), timeout=1.0
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("model", ["good-gpt", "good-claude"])
def test_streaming_from_openai_and_anthropic_fakes_with_the_sdk(pipeline, model):
    client = openai.OpenAI(base_url=f"{pipeline.edge}/v1", api_key=DEV_KEY, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HELLO[0]["content"]
    assert chunks[-1].usage.completion_tokens == len(HELLO[0]["content"].split())
    unary = client.chat.completions.create(model=model, messages=HELLO)
    assert unary.choices[0].message.content == HELLO[0]["content"]


def test_a_tool_call_answer_has_tool_calls_and_no_content_as_in_openai_json(edge):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    reply = chat(edge, "good-gpt", tools=[weather], tool_choice="required")
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "content" not in message  # OpenAI: null beside tool calls, never ""
    plain = chat(edge, "good-gpt").json()["choices"][0]["message"]
    assert "tool_calls" not in plain and plain["content"]


def test_token_array_embeddings_reach_a_provider_that_accepts_them(edge):
    def embed(value):
        reply = edge.post("/v1/embeddings", json={"model": "good-embedding", "input": value})
        assert reply.status_code == 200, reply.text
        return reply.json()

    # The fake embeds a token array as the text of its ids: equal vectors mean the ids arrived as ids.
    tokens = embed([[101, 7592, 102], [42]])
    assert tokens["data"][0]["embedding"] == embed("101 7592 102")["data"][0]["embedding"]
    assert tokens["usage"]["prompt_tokens"] == 4  # one per token id, counted by the provider
    assert embed([5, 6])["data"][0]["embedding"] == embed("5 6")["data"][0]["embedding"]


def test_cost_header_prices_the_answer(edge):
    reply = chat(edge, "good-gpt", cache=False)
    usage = reply.json()["usage"]
    expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert float(reply.headers["x-sophia-cost-usd"]) == pytest.approx(expected, abs=1e-6)


def test_exact_cache_hit_and_opt_outs(edge):
    messages = [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}]
    first = chat(edge, "good-gpt", messages=messages, temperature=0)
    second = chat(edge, "good-gpt", messages=messages, temperature=0)
    assert first.headers["x-sophia-cache"] == "miss"
    for _ in range(20):  # the store happens off the response path
        if second.headers["x-sophia-cache"] == "hit":
            break
        time.sleep(0.1)
        second = chat(edge, "good-gpt", messages=messages, temperature=0)
    assert second.headers["x-sophia-cache"] == "hit"
    assert second.headers["x-sophia-attempts"] == "0"
    assert float(second.headers["x-sophia-cost-usd"]) == 0
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]
    assert (
        chat(edge, "good-gpt", messages=messages, temperature=0, cache=False).headers["x-sophia-cache"]
        == "bypass"
    )
    no_cache = chat(edge, "good-gpt", messages=messages, temperature=0, headers={"Cache-Control": "no-cache"})
    assert no_cache.headers["x-sophia-cache"] == "bypass"
    assert chat(edge, "good-gpt", messages=messages, temperature=0.7).headers["x-sophia-cache"] == "bypass"


def test_cache_never_crosses_tenants(pipeline, edge):
    messages = [{"role": "user", "content": f"tenant isolation {uuid.uuid4().hex}"}]
    chat(edge, "good-gpt", messages=messages, temperature=0)
    time.sleep(0.5)
    other = chat(
        edge, "good-gpt", messages=messages, temperature=0, headers={"Authorization": f"Bearer {BUDGET_KEY}"}
    )
    assert other.headers["x-sophia-cache"] == "miss"


async def test_usage_is_recorded_once_per_request_id(pipeline, edge):
    request_id = f"retry-{uuid.uuid4().hex}"
    messages = [{"role": "user", "content": f"count me once {request_id}"}]
    before = await usage_report(pipeline, "dev")
    for _ in range(3):
        reply = chat(edge, "good-gpt", messages=messages, cache=False, headers={"x-request-id": request_id})
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == request_id
    await asyncio.sleep(1.0)
    after = await usage_report(pipeline, "dev")
    assert after.total.requests - before.total.requests == 1


async def test_usage_survives_a_ledger_outage_mid_load(pipeline):
    before = await usage_report(pipeline, "dev")
    sent = 0
    outage_over = asyncio.Event()

    async def fire(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while not outage_over.is_set():
            reply = await client.post(
                "/v1/chat/completions",
                json={"model": "good-gpt", "messages": HELLO, "max_tokens": 4, "cache": False},
            )
            assert reply.status_code == 200, reply.text
            sent += 1

    async with httpx.AsyncClient(
        base_url=pipeline.edge, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=60
    ) as client:
        load = asyncio.gather(*(fire(client) for _ in range(4)))
        await asyncio.sleep(0.3)
        killed = pipeline.mesh.processes.pop("ledger")
        killed.kill()  # no goodbye: whatever it had not acknowledged must come back from the outbox
        await asyncio.to_thread(killed.wait)
        await asyncio.sleep(1.5)
        pipeline.mesh.start("ledger")
        await asyncio.to_thread(pipeline.mesh.wait_ready, ["ledger"], 60)
        await asyncio.sleep(0.3)
        outage_over.set()
        await load
    expected = before.total.requests + sent
    for _ in range(60):
        after = await usage_report(pipeline, "dev")
        if after.total.requests >= expected:
            break
        await asyncio.sleep(0.5)
    assert after.total.requests == expected
    assert "spooled" in pipeline.mesh.log_path("gateway").read_text(), "the outage never reached the outbox"


async def test_budget_hard_stop_refuses_before_any_provider_call(pipeline):
    async with internal_channel(pipeline.mesh, "ledger") as channel:
        await ledger_pb2_grpc.LedgerServiceStub(channel).SetBudget(
            ledger_pb2.SetBudgetRequest(tenant_id="budgeted", monthly_limit_micros=1, hard_stop=True),
            timeout=10,
        )
    with httpx.Client(
        base_url=pipeline.edge, headers={"Authorization": f"Bearer {BUDGET_KEY}"}, timeout=30
    ) as client:
        # Spends more than the one micro-dollar allowed (unless earlier tests already did).
        assert chat(client, "good-gpt", cache=False).status_code in (200, 429)
        refused = None
        for _ in range(30):  # the spend lands off the response path
            refused = chat(client, "good-gpt", cache=False)
            if refused.status_code == 429:
                break
            await asyncio.sleep(0.1)
    assert refused.status_code == 429
    assert "budget" in refused.json()["error"]["message"]
    assert "x-sophia-provider" not in refused.headers  # refused before any provider was called


def test_provider_key_never_reaches_logs_or_clients(pipeline, edge):
    # The "wrongkey" fake rejects our key with a 401 that quotes it back, as real providers do.
    reply = chat(edge, "wrongkey-gpt", cache=False)
    assert reply.status_code >= 400
    assert CANARY_KEY not in reply.text
    assert CANARY_KEY not in str(reply.headers)
    time.sleep(0.5)
    logs = pipeline.logs()
    assert "wrongkey" in logs or "http_401" in logs  # the failure itself was logged…
    assert CANARY_KEY not in logs  # …without the key


def _samples(exposition: str, name: str, **labels: str) -> list[float]:
    """Values of the Prometheus samples called `name` whose labels include `labels`."""
    values = []
    for line in exposition.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values


def test_prometheus_metrics_count_tokens_cost_cache_and_provider_errors(pipeline, edge):
    chat(edge, "fail500-gpt", cache=False)
    text = httpx.get(pipeline.metrics_url, timeout=10).text
    assert sum(_samples(text, "sophia_gateway_tokens_total", model="good-gpt", direction="output")) > 0
    assert sum(_samples(text, "sophia_gateway_cache_total", result="bypass")) > 0
    assert _samples(text, "sophia_gateway_provider_errors_total", provider="fail500", kind="http_500")
    assert [line for line in text.splitlines() if line.startswith("sophia_gateway_cost")]
    assert _samples(text, "rpc_server_duration_milliseconds_count", rpc_grpc_status_code="OK")
    # The GenAI semantic conventions' metrics: each provider call, failed ones with their error type.
    calls = "gen_ai_client_operation_duration_seconds_count"
    assert sum(_samples(text, calls, gen_ai_provider_name="fail500", error_type="http_500")) > 0
    assert sum(_samples(text, calls, gen_ai_provider_name="good", gen_ai_request_model="good-gpt")) > 0
    usage = "gen_ai_client_token_usage_sum"
    assert sum(_samples(text, usage, gen_ai_token_type="output", gen_ai_request_model="good-gpt")) > 0
    assert _samples(text, "sophia_gateway_usage_pending")  # the journal's backlog, for the alert


def test_a_stream_that_fails_after_its_first_token_ends_in_an_sdk_error(pipeline):
    client = openai.OpenAI(base_url=f"{pipeline.edge}/v1", api_key=DEV_KEY, max_retries=0)
    received = []
    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]
    with pytest.raises(openai.APIError) as raised:
        for chunk in client.chat.completions.create(model="drop-gpt", messages=long_prompt, stream=True):
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received), "the failure should come after the first tokens"
    assert "mid-stream" in str(raised.value)


def test_with_the_router_down_the_gateway_routes_by_the_same_rules(pipeline, edge):
    pipeline.mesh.stop("router")
    try:
        reply = chat(edge, "fail500-gpt", cache=False)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-sophia-model"] == "good-gpt"  # the fallback map, applied locally
        assert reply.headers["x-sophia-attempts"] == "2"
        assert chat(edge, "auto", cache=False).headers["x-sophia-model"] == "good-gpt"
        assert "routing by the configured rules" in pipeline.mesh.log_path("gateway").read_text()
    finally:
        pipeline.mesh.start("router")
        pipeline.mesh.wait_ready(["router"], 60)
