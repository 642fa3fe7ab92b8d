"""The unmodified `openai` SDK and plain HTTP against the Envoy edge, served by the real local model."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from tests.integration.conftest import DEV_KEY
from tests.support import internal_blocking_channel

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=DEV_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(mesh):
    with httpx.Client(base_url=mesh.edge_url, timeout=120) as session:
        yield session


def test_chat_completion_returns_generated_text_with_metadata_headers(client):
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=PROMPT, max_tokens=24)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "smollm2-135m-instruct"
    assert "paris" in completion.choices[0].message.content.lower()
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.headers["x-sophia-provider"] == "local"
    assert raw.headers["x-sophia-model"] == "smollm2-135m-instruct"
    assert completion.id == f"chatcmpl-{raw.headers['x-request-id']}"


def test_numbers_stay_json_numbers(http):
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": "auto", "messages": PROMPT, "max_tokens": 4},
    )
    body = reply.json()
    assert reply.status_code == 200, body
    assert isinstance(body["created"], int)
    assert isinstance(body["usage"]["prompt_tokens"], int)
    assert isinstance(body["choices"][0]["index"], int)


def test_streaming_chat_arrives_as_server_sent_events(client, http):
    stream = client.chat.completions.create(
        model="auto", messages=PROMPT, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "paris" in text.lower()
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    with http.stream(
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": "auto", "messages": PROMPT, "max_tokens": 8, "stream": True},
    ) as raw:
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0][len("data: ") :])["object"] == "chat.completion.chunk"


def test_stream_flag_nested_inside_a_message_does_not_switch_to_streaming(http):
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={
            "model": "auto",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": '{"stream": true}'}],
        },
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["object"] == "chat.completion"


def test_embeddings_have_384_dimensions_in_both_encodings(client):
    default = client.embeddings.create(model="all-minilm-l6-v2", input=["The cat sat.", "A dog ran."])
    assert [len(item.embedding) for item in default.data] == [384, 384]
    assert default.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="all-minilm-l6-v2", input="The cat sat.", encoding_format="float")
    assert len(floats.data[0].embedding) == 384
    assert floats.data[0].embedding == pytest.approx(default.data[0].embedding, abs=1e-6)


def test_models_list_shows_the_configured_models(client):
    ids = {model.id for model in client.models.list()}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= ids


def test_models_retrieve_answers_one_model_and_404_for_an_unknown_one(client):
    model = client.models.retrieve("smollm2-135m-instruct")
    assert (model.id, model.object) == ("smollm2-135m-instruct", "model")
    assert model.owned_by == "huggingfacetb"
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize("key", [None, "sk-wrong-key-123456"])
def test_missing_or_wrong_key_is_401(http, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = http.post("/v1/chat/completions", headers=headers, json={"model": "auto", "messages": PROMPT})
    assert reply.status_code == 401
    assert "key" in reply.text.lower()


def test_sdk_surfaces_authentication_errors(mesh):
    client = openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key="sk-wrong-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    assert "invalid api key" in str(raised.value).lower()


# case, body, HTTP status, text the message must contain, `param` of the error (None: not checked)
BAD_BODIES = [
    ("invalid json", b'{"model": "auto", "messages": [', 400, "", None),
    ("empty messages", {"model": "auto", "messages": []}, 400, "messages", "messages"),
    (
        "unknown role",
        {"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages[0].role",
        "messages[0].role",
    ),
    (
        "negative max_tokens",
        {"model": "auto", "messages": PROMPT, "max_tokens": -5},
        400,
        "max_tokens",
        "max_tokens",
    ),
    (
        "temperature out of range",
        {"model": "auto", "messages": PROMPT, "temperature": 7},
        400,
        "temperature",
        "temperature",
    ),
    ("unknown model", {"model": "gpt-17-ultra", "messages": PROMPT}, 404, "model", None),
    ("n above one", {"model": "auto", "messages": PROMPT, "n": 3}, 400, "n:", "n"),
    ("unknown field", {"model": "auto", "messages": PROMPT, "extra": 1}, 400, "extra", "extra"),
    ("wrong type", {"model": "auto", "messages": PROMPT, "max_tokens": "many"}, 400, "max_tokens", None),
    (
        "image part",
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
        "messages[0].content[0]",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "field", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
def test_bad_input_through_the_edge_is_a_clear_4xx(http, case, body, status, field, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"},
        content=content,
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert field in error["message"]
    if param is not None:
        # From the status's google.rpc.BadRequest detail (or the edge's own refusal), not the message.
        assert error["param"] == param, error


def test_sdk_errors_name_the_field_in_param(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="auto", messages=PROMPT, max_tokens=-5)
    assert raised.value.param == "max_tokens"
    assert raised.value.code == "INVALID_ARGUMENT"


def test_oversized_body_is_413(http, mesh):
    filler = "x" * (mesh.config.edge.max_body_bytes + 1024)
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": "auto", "messages": [{"role": "user", "content": filler}]},
    )
    assert reply.status_code == 413
    assert reply.json()["error"]["message"]


def test_client_x_envoy_headers_do_not_reach_routing(http):
    # A client must not be able to steer Envoy (e.g. shorten or lengthen our timeouts, force retries).
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}", "x-envoy-upstream-rq-timeout-ms": "1"},
        json={"model": "auto", "messages": PROMPT, "max_tokens": 4},
    )
    assert reply.status_code == 200


def test_embeddings_and_chats_are_recorded_in_the_ledger(mesh, client):
    client.embeddings.create(model="all-minilm-l6-v2", input="count this")
    client.chat.completions.create(model="auto", messages=PROMPT, max_tokens=2)
    with internal_blocking_channel(mesh, "ledger") as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        for _ in range(50):  # usage is recorded off the response path
            report = ledger.GetUsageReport(ledger_pb2.GetUsageReportRequest(tenant_id="dev"), timeout=10)
            models = {row.key: row for row in report.rows}
            if {"all-minilm-l6-v2", "smollm2-135m-instruct"} <= set(models):
                break
            time.sleep(0.1)
    assert models["all-minilm-l6-v2"].input_tokens > 0
    assert models["all-minilm-l6-v2"].output_tokens == 0
    assert models["smollm2-135m-instruct"].output_tokens > 0
    assert models["smollm2-135m-instruct"].cost_micros == 0  # the local model is free


def test_errors_carry_the_request_id(http):
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}", "x-request-id": "client-chosen-id-7"},
        json={"model": "auto", "messages": PROMPT, "max_tokens": -1},
    )
    assert reply.status_code == 400
    assert reply.headers["x-request-id"] == "client-chosen-id-7"


def test_an_overlong_request_id_is_refused(http):
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}", "x-request-id": "x" * 200},
        json={"model": "auto", "messages": PROMPT, "max_tokens": 1},
    )
    assert reply.status_code == 400
    assert "x-request-id" in reply.json()["error"]["message"]


def test_the_sdks_own_streamed_message_goes_back_as_history(client):
    # The stream helper's message serialises every field the SDK knows, those Sophia does not declare
    # (annotations, audio, function_call, parsed) as null: a chat loop sends it back as it is.
    with client.chat.completions.stream(model="auto", messages=PROMPT, max_tokens=8) as stream:
        for _ in stream:
            pass
        message = stream.get_final_completion().choices[0].message
    follow_up = [*PROMPT, message, {"role": "user", "content": "And of Italy?"}]
    completion = client.chat.completions.create(model="auto", messages=follow_up, max_tokens=4)
    assert completion.choices[0].message.content


# Fields of the SDK's message objects that Sophia does not declare, as the SDK serialises them when unset.
SDK_NULLS = {"annotations": None, "audio": None, "function_call": None, "parsed": None, "tool_calls": None}


def _history(assistant_extra: dict) -> list[dict]:
    assistant = {"role": "assistant", "content": "Paris.", "refusal": None, **assistant_extra}
    return [*PROMPT, assistant, {"role": "user", "content": "And of Italy?"}]


def test_undeclared_members_that_are_null_are_accepted(http):
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": "auto", "max_tokens": 4, "messages": _history(SDK_NULLS)},
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("assistant_extra", "param"),
    [
        ({"annotations": []}, "messages[].annotations"),
        ({"audio": {"id": "audio_1"}}, "messages[].audio"),
        ({"annotations": None, "parsed": "Paris."}, "messages[].parsed"),
    ],
    ids=["annotations", "audio", "parsed"],
)
def test_undeclared_members_with_a_value_are_still_refused(http, assistant_extra, param):
    reply = http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": "auto", "max_tokens": 4, "messages": _history(assistant_extra)},
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "unknown field" in error["message"], error


STREAMS_WITH_USAGE = {
    "stream_options": ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}),
    "streamOptions": ("/v1/chat/completions", {"stream": True, "streamOptions": {"includeUsage": True}}),
    ":stream path": ("/v1/chat/completions:stream", {"stream_options": {"include_usage": True}}),
}


@pytest.mark.parametrize("spelling", STREAMS_WITH_USAGE, ids=list(STREAMS_WITH_USAGE))
def test_done_comes_after_the_usage_chunk(http, spelling):
    path, extra = STREAMS_WITH_USAGE[spelling]
    with http.stream(
        "POST",
        path,
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        json={"model": "auto", "messages": PROMPT, "max_tokens": 4, **extra},
    ) as raw:
        assert raw.status_code == 200
        body = raw.read().decode()
    events = [event[len("data: ") :] for event in body.split("\n\n") if event.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events
    assert json.loads(events[-2])["usage"]["completion_tokens"] > 0


def test_an_answers_headers_reach_the_http_client_and_the_edge_access_log(mesh, http):
    """The Gateway sends a unary answer's headers in the answer's own gRPC batch (trailing metadata, asked
    for by the edge); the edge lifts them into the HTTP headers, where clients and its access log read
    them."""
    auth = {"Authorization": f"Bearer {DEV_KEY}"}
    chat = http.post(
        "/v1/chat/completions",
        headers={**auth, "x-request-id": "lifted-chat-1"},
        json={"model": "auto", "messages": PROMPT, "max_tokens": 2},
    )
    embedding = http.post(
        "/v1/embeddings",
        headers={**auth, "x-request-id": "lifted-embedding-1"},
        json={"model": "all-minilm-l6-v2", "input": "lift this"},
    )
    for reply, request_id in ((chat, "lifted-chat-1"), (embedding, "lifted-embedding-1")):
        assert reply.status_code == 200
        assert reply.headers.get_list("x-request-id") == [request_id]
        assert reply.headers["x-sophia-provider"] == "local" and "x-sophia-cost-usd" in reply.headers
    logged: set[str] = set()
    for _ in range(100):
        lines = mesh.log_path("envoy").read_text().splitlines()
        logged = {json.loads(line).get("request_id") for line in lines if line.startswith('{"')}
        if {"lifted-chat-1", "lifted-embedding-1"} <= logged:
            break
        time.sleep(0.1)
    assert {"lifted-chat-1", "lifted-embedding-1"} <= logged
