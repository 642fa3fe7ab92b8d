"""What OpenAI SDKs send and read through the edge, against a provider that takes tool turns and, like
many compatible servers, ignores stream_options (no usage event in its streams, nor in its answers). Its
own mesh, without the local model: the provider is a few lines of HTTP server in this process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import yaml
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from libs.config import REPO_ROOT
from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tests.support import free_port_block, internal_blocking_channel, mesh_environ
from tools.mesh import Mesh

CLIENT_KEY = "sk-sdk-shapes-client-01"
# Its tenant's usage report holds one stream's record and nothing else.
STREAM_KEY = "sk-sdk-shapes-stream-01"
PROVIDER_KEY = "sk-sdk-shapes-provider-01"
MODEL = "silent-gpt"
ANSWER = ("Paris ", "is ", "the ", "capital ", "of ", "France.")


class _NoUsageProvider(BaseHTTPRequestHandler):
    """Answers ANSWER, streamed as OpenAI chunks then a finish reason and [DONE]: never with usage."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(ANSWER)}
            answer = {"id": "chatcmpl-silent", "object": "chat.completion", "created": 0, "model": "silent"}
            answer["choices"] = [{"index": 0, "message": message, "finish_reason": "stop"}]
            self._send(200, "application/json", json.dumps(answer).encode())
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        base = {"id": "chatcmpl-silent", "object": "chat.completion.chunk", "created": 0, "model": "silent"}
        deltas = [({"role": "assistant", "content": ""}, None)]
        deltas += [({"content": piece}, None) for piece in ANSWER] + [({}, "stop")]
        for delta, finish in deltas:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def _config(provider_url: str, state) -> dict:
    base = yaml.safe_load((REPO_ROOT / "config" / "sophia.yaml").read_text())
    return {
        **{k: base[k] for k in ("inference", "redis")},
        "auth": {
            "tenants": {
                "dev": {"api_keys": [{"name": "dev", "key": CLIENT_KEY}]},
                "streams": {"api_keys": [{"name": "streams", "key": STREAM_KEY}]},
            }
        },
        "providers": {
            "local": {"type": "local"},
            "silent": {"type": "openai", "base_url": f"{provider_url}/v1", "api_key_env": "SILENT_KEY"},
        },
        "models": {
            MODEL: {"provider": "silent", "kind": "chat", "provider_model": "silent"},
            "all-minilm-l6-v2": {"provider": "local", "kind": "embedding", "dimensions": 384},
        },
        "routing": {"default_chain": [MODEL], "default_embedding_model": "all-minilm-l6-v2"},
        "ledger": {"prices": {MODEL: {"input_per_mtok_usd": 1.0, "output_per_mtok_usd": 2.0}}},
        "gateway": {"outbox_dir": str(state / "outbox")},
    }


@pytest.fixture(scope="module")
def silent_mesh(tmp_path_factory) -> Iterator[Mesh]:
    provider = ThreadingHTTPServer(("127.0.0.1", 0), _NoUsageProvider)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    state = tmp_path_factory.mktemp("silent-mesh")
    config_path = state / "sophia.yaml"
    config_path.write_text(yaml.safe_dump(_config(f"http://127.0.0.1:{provider.server_port}", state)))
    environ = mesh_environ({"SOPHIA_CONFIG": str(config_path), "SILENT_KEY": PROVIDER_KEY})
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = str(free_port_block(len(PROMETHEUS_PORT_OFFSETS)))
    running = Mesh(state, environ)
    components = ["redis", "router", "cache", "ledger", "gateway", "envoy"]
    try:
        for component in components:
            running.start(component)
        running.wait_ready(components, 120)
        yield running
    finally:
        running.stop_all()
        provider.shutdown()


@pytest.fixture(scope="module")
def client(silent_mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{silent_mesh.edge_url}/v1", api_key=CLIENT_KEY, max_retries=0)


def test_a_tool_call_sent_back_with_the_sdks_nulls_is_accepted(client):
    # As the SDK serialises a message from its stream helper: what it knows and Sophia does not, null.
    call = {"id": "call_1", "type": "function", "index": 0}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Paris"}', "parsed_arguments": None}
    assistant = {"role": "assistant", "content": "", "refusal": None, "tool_calls": [call]}
    assistant |= {"annotations": None, "audio": None, "function_call": None, "parsed": None}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        assistant,
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    completion = client.chat.completions.create(model=MODEL, messages=messages, tools=[tool])
    assert completion.choices[0].message.content == "".join(ANSWER)


def _billed(mesh: Mesh) -> ledger_pb2.UsageRow:
    with internal_blocking_channel(mesh, "ledger") as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        request = ledger_pb2.GetUsageReportRequest(tenant_id="streams", group_by=ledger_pb2.GROUP_BY_MODEL)
        for _ in range(100):  # usage is recorded off the response path
            rows = {row.key: row for row in ledger.GetUsageReport(request, timeout=10).rows}
            if MODEL in rows:
                return rows[MODEL]
            time.sleep(0.1)
    raise AssertionError(f"no usage recorded for {MODEL}")


def test_the_usage_chunk_says_what_is_billed_when_the_provider_streams_none(silent_mesh):
    client = openai.OpenAI(base_url=f"{silent_mesh.edge_url}/v1", api_key=STREAM_KEY, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"cache": False},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(ANSWER)
    usage = chunks[-1].usage
    assert usage is not None
    # Estimated as the bill is (the provider said nothing), not the provider's silence as 0/0.
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    billed = _billed(silent_mesh)
    assert (usage.prompt_tokens, usage.completion_tokens) == (billed.input_tokens, billed.output_tokens)
