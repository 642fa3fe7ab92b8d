"""Overload is shed, not queued; slow clients cannot hold the edge open.

A mesh (no ModelInference) in front of the fake provider, with tiny limits: 4 requests in flight per
Gateway (and at the edge's circuit breaker), 2 per tenant, and 1-second request timeouts at the edge.
Slow requests ask the fake provider for latency (`fault=latency:<s>` in the prompt).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import grpc
import httpx
import pytest
import yaml
from google.protobuf import struct_pb2
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.support import free_port_block, mesh_environ
from tools.bench import BENCH_MODEL, PROVIDER_KEY, PROVIDER_KEY_ENV, bench_config, start_provider
from tools.mesh import COMPONENTS, Mesh

KEYS = {tenant: f"sk-overload-{tenant}-0001" for tenant in ("alpha", "beta", "gamma")}
MAX_INFLIGHT = 4  # per tenant: ceil(4 * 0.5) = 2
RETRY_AFTER_MS = 1500
EDGE_TIMEOUT_SECONDS = 1.0
SLOW_SECONDS = 3.0
# The refusals must come back long before the slow requests could have been answered.
REFUSED_WITHIN_SECONDS = SLOW_SECONDS - 1.0
MESH_COMPONENTS = tuple(c for c in COMPONENTS if c != "inference")


@pytest.fixture(scope="module")
def overload_mesh(tmp_path_factory):
    state = tmp_path_factory.mktemp("overload")
    provider, provider_url = start_provider(state)
    config = bench_config(provider_url)
    config["auth"]["tenants"] = {t: {"api_keys": [{"name": t, "key": k}]} for t, k in KEYS.items()}
    config["models"][BENCH_MODEL]["context_window"] = 1_000_000  # room for the large-body test
    config["gateway"].update(
        max_inflight_requests=MAX_INFLIGHT,
        max_tenant_share=0.5,
        overload_retry_after_ms=RETRY_AFTER_MS,
        outbox_dir=str(state / "outbox"),
    )
    config["edge"].update(
        request_timeout_seconds=EDGE_TIMEOUT_SECONDS, request_headers_timeout_seconds=EDGE_TIMEOUT_SECONDS
    )
    config_path = state / "overload.yaml"
    config_path.write_text(yaml.safe_dump(config))
    environ = mesh_environ({"SOPHIA_CONFIG": str(config_path), PROVIDER_KEY_ENV: PROVIDER_KEY})
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = str(free_port_block(5))
    mesh = Mesh(state, environ)
    try:
        for component in MESH_COMPONENTS:
            mesh.start(component)
        mesh.wait_ready(MESH_COMPONENTS, 180)
        yield mesh
    finally:
        mesh.stop_all()
        provider.terminate()
        provider.wait(10)


def chat_body(prompt: str, **extra) -> dict:
    return {"model": BENCH_MODEL, "messages": [{"role": "user", "content": prompt}], "cache": False, **extra}


def slow(prompt: str = "slow") -> dict:
    return chat_body(f"fault=latency:{SLOW_SECONDS} {prompt}")


async def post(client: httpx.AsyncClient, tenant: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"}
    )
    return response, time.monotonic() - started


def edge_client(mesh: Mesh) -> httpx.AsyncClient:
    # One connection per concurrent request, as independent clients would have.
    return httpx.AsyncClient(base_url=mesh.edge_url, timeout=30, limits=httpx.Limits(max_connections=64))


def assert_refused_with_retry_hints(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["retry-after-ms"] == str(RETRY_AFTER_MS)
    assert response.headers["retry-after"] == "2"  # 1.5 s, rounded up
    assert response.json()["error"]["code"] == code


def test_a_flooding_tenant_is_refused_at_once_while_another_is_served(overload_mesh):
    async def scenario():
        async with edge_client(overload_mesh) as client:
            flood = [asyncio.create_task(post(client, "alpha", slow(f"flood {i}"))) for i in range(8)]
            # All but alpha's share are refused at once (by the Gateway, or already by the edge when the
            # flood arrives faster than the Gateway refuses); alpha then holds its 2 slots.
            _, held = await asyncio.wait(flood, timeout=REFUSED_WITHIN_SECONDS)
            other, _ = await post(client, "beta", chat_body("still served"))
            return len(held), other, await asyncio.gather(*flood)

    still_held, other, flood = asyncio.run(scenario())
    assert still_held == 2  # alpha's share: ceil(4 * 0.5)
    assert other.status_code == 200, other.text
    assert other.json()["choices"][0]["message"]["content"] == "still served"
    assert [r.status_code for r, _ in flood].count(200) == 2
    refused = [r for r, _ in flood if r.status_code != 200]
    assert len(refused) == 6
    assert any(r.status_code == 429 for r in refused)  # at least the third reached the Gateway
    for response in refused:
        if response.status_code == 429:
            assert_refused_with_retry_hints(response, 429, "RESOURCE_EXHAUSTED")
            assert "alpha" in response.json()["error"]["message"]
        else:
            assert_refused_with_retry_hints(response, 503, "UNAVAILABLE")

    metrics = httpx.get(
        f"http://127.0.0.1:{overload_mesh.config.telemetry.prometheus_base_port}/metrics", timeout=10
    ).text
    assert any(
        line.startswith("sophia_gateway_admission_refused_total{") and 'reason="tenant_share_used"' in line
        for line in metrics.splitlines()
    )

    async def after_the_flood():
        async with edge_client(overload_mesh) as client:
            return await asyncio.gather(*(post(client, "alpha", chat_body(f"again {i}")) for i in range(2)))

    assert [r.status_code for r, _ in asyncio.run(after_the_flood())] == [200, 200]


def test_the_edge_refuses_beyond_the_gateway_limit_with_503_and_retry_hints(overload_mesh):
    async def scenario():
        async with edge_client(overload_mesh) as client:
            # Every tenant within its share, but 6 together are more than the 4 the edge lets through.
            return await asyncio.gather(
                *(post(client, tenant, slow(f"{tenant} {i}")) for tenant in KEYS for i in range(2))
            )

    answers = asyncio.run(scenario())
    assert sorted(r.status_code for r, _ in answers) == [200] * MAX_INFLIGHT + [503] * 2
    for response, elapsed in answers:
        if response.status_code == 503:
            assert_refused_with_retry_hints(response, 503, "UNAVAILABLE")
            assert elapsed < REFUSED_WITHIN_SECONDS


def test_the_gateway_refuses_direct_grpc_callers_beyond_its_limit(overload_mesh):
    async def call(stub, tenant: str, prompt: str):
        request = gateway_pb2.CreateChatCompletionRequest(
            params=gateway_pb2.ChatCompletionParams(
                model=BENCH_MODEL,
                messages=[
                    gateway_pb2.ChatMessage(role="user", content=struct_pb2.Value(string_value=prompt))
                ],
                cache=False,
            )
        )
        try:
            await stub.CreateChatCompletion(
                request, metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=30
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), dict(error.trailing_metadata() or ())
        return grpc.StatusCode.OK, {}

    async def scenario():
        async with grpc.aio.insecure_channel(overload_mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            held = [
                asyncio.create_task(call(stub, tenant, f"fault=latency:{SLOW_SECONDS} {tenant} {i}"))
                for tenant in ("alpha", "beta")
                for i in range(2)
            ]
            await asyncio.sleep(0.5)
            refused = await call(stub, "gamma", "no room")
            return refused, await asyncio.gather(*held)

    (code, trailers), held = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert trailers["retry-after-ms"] == str(RETRY_AFTER_MS)
    assert trailers["retry-after"] == "2"
    assert [c for c, _ in held] == [grpc.StatusCode.OK] * MAX_INFLIGHT


def test_a_stream_holds_its_slot_until_it_ends(overload_mesh):
    async def stream(client: httpx.AsyncClient) -> list[str]:
        body = chat_body("fault=chunk_latency:0.3 one two three four five six", stream=True)
        headers = {"Authorization": f"Bearer {KEYS['alpha']}"}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            return [line async for line in response.aiter_lines() if line.startswith("data:")]

    async def scenario():
        async with edge_client(overload_mesh) as client:
            streams = [asyncio.create_task(stream(client)) for _ in range(2)]
            await asyncio.sleep(0.8)  # both streams are under way
            during, _ = await post(client, "alpha", chat_body("while streaming"))
            events = await asyncio.gather(*streams)
            after, _ = await post(client, "alpha", chat_body("after the streams"))
            return during, events, after

    during, events, after = asyncio.run(scenario())
    assert during.status_code == 429, during.text
    assert all(lines[-1] == "data: [DONE]" for lines in events)
    assert after.status_code == 200, after.text


def test_a_stream_the_client_abandons_gives_its_slot_back(overload_mesh):
    async def abandon(client: httpx.AsyncClient) -> None:
        body = chat_body("fault=chunk_latency:1 one two three four five six seven eight", stream=True)
        headers = {"Authorization": f"Bearer {KEYS['beta']}"}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    return  # leaves after the first event: the connection is closed mid-stream

    async def scenario():
        async with edge_client(overload_mesh) as client:
            await asyncio.gather(abandon(client), abandon(client))
        async with edge_client(overload_mesh) as client:
            # The abandoned streams had beta's whole share; their slots come back once the cancellation
            # reaches the Gateway, long before the streams would have ended by themselves (8 s).
            deadline = time.monotonic() + 5
            while True:
                response, _ = await post(client, "beta", chat_body("after abandoning"))
                if response.status_code == 200 or time.monotonic() > deadline:
                    return response
                await asyncio.sleep(0.2)

    assert asyncio.run(scenario()).status_code == 200


# --- slow clients at the edge ------------------------------------------------------------------------


def open_trickle(mesh: Mesh, body_bytes: int) -> socket.socket:
    """A client that sends its headers, promises a body, and then trickles it a few bytes at a time."""
    sock = socket.create_connection((mesh.config.edge.host, mesh.config.edge.port), timeout=10)
    sock.sendall(
        (
            "POST /v1/chat/completions HTTP/1.1\r\n"
            f"Host: edge\r\nAuthorization: Bearer {KEYS['alpha']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_bytes}\r\n\r\n"
        ).encode()
    )
    return sock


def trickle_until_cut(sock: socket.socket, give_up_after: float) -> tuple[bytes, float]:
    """Trickles body bytes until the edge answers or closes; returns what it said and when."""
    started = time.monotonic()
    sock.settimeout(0.2)
    received = b""
    while time.monotonic() - started < give_up_after:
        try:
            sock.sendall(b" ")
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset by the edge
            break
        if not chunk:  # closed by the edge
            break
        received += chunk
    return received, time.monotonic() - started


def test_slow_body_clients_are_cut_while_a_normal_client_is_served(overload_mesh):
    trickles = [open_trickle(overload_mesh, 1_000_000) for _ in range(5)]
    try:
        response = httpx.post(
            f"{overload_mesh.edge_url}/v1/chat/completions",
            json=chat_body("unaffected"),
            headers={"Authorization": f"Bearer {KEYS['beta']}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        for sock in trickles:
            said, after = trickle_until_cut(sock, give_up_after=10)
            assert after < EDGE_TIMEOUT_SECONDS + 4
            assert said.startswith(b"HTTP/1.1 408"), said[:200]
    finally:
        for sock in trickles:
            sock.close()


def test_a_body_without_credentials_is_refused_before_it_is_read(overload_mesh):
    """Headers that promise 1 MB but carry no key get 401 at once, without a byte of the body sent."""
    with socket.create_connection((overload_mesh.config.edge.host, overload_mesh.config.edge.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        )
        sock.settimeout(EDGE_TIMEOUT_SECONDS / 2)  # well before request_timeout could answer 408
        head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    error = json.loads(body)["error"]
    assert error["code"] == "UNAUTHENTICATED" and error["type"] == "authentication_error"
    assert "Authorization: Bearer" in error["message"]
    # Without a body the request still reaches the Gateway, which answers the same 401 itself.
    models = httpx.get(f"{overload_mesh.edge_url}/v1/models", timeout=10)
    assert models.status_code == 401
    assert models.json()["error"]["code"] == error["code"]


def test_a_large_body_still_passes_the_small_per_connection_buffer(overload_mesh):
    """The 32 KiB read buffer per connection is flow control: bodies up to max_body_bytes still arrive."""
    words = "word " * 180_000  # 900 kB, under the 1 MiB body limit
    response = httpx.post(
        f"{overload_mesh.edge_url}/v1/chat/completions",
        json=chat_body(words),
        headers={"Authorization": f"Bearer {KEYS['gamma']}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text[:300]
    assert response.json()["choices"][0]["message"]["content"] == words.strip()


def test_slow_header_clients_are_cut(overload_mesh):
    with socket.create_connection((overload_mesh.config.edge.host, overload_mesh.config.edge.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n")
        sock.settimeout(0.2)
        started, closed = time.monotonic(), False
        while time.monotonic() - started < 10 and not closed:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                closed = sock.recv(65536) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        assert closed
        assert time.monotonic() - started < EDGE_TIMEOUT_SECONDS + 4


def test_answers_and_streams_may_outlast_the_request_timeout(overload_mesh):
    """Envoy's request_timeout stops once the request is in: a slow answer and a long stream finish."""
    headers = {"Authorization": f"Bearer {KEYS['gamma']}"}
    slow_answer = httpx.post(
        f"{overload_mesh.edge_url}/v1/chat/completions",
        json=chat_body(f"fault=latency:{EDGE_TIMEOUT_SECONDS * 2} late"),
        headers=headers,
        timeout=30,
    )
    assert slow_answer.status_code == 200, slow_answer.text
    started = time.monotonic()
    body = chat_body("fault=chunk_latency:0.4 a b c d e f", stream=True)
    with httpx.stream(
        "POST", f"{overload_mesh.edge_url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data:")]
    assert time.monotonic() - started > EDGE_TIMEOUT_SECONDS
    assert lines[-1] == "data: [DONE]"
    assert "".join(
        json.loads(line[5:])["choices"][0]["delta"].get("content") or ""
        for line in lines[:-1]
        if json.loads(line[5:])["choices"]
    ).strip()
