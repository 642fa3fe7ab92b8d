"""The contract's two faces: typed fields for gRPC callers, OpenAI's exact JSON for REST callers."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest
from sophia.gateway.v1 import gateway_pb2 as pb
from sophia.gateway.v1 import gateway_pb2_grpc

from tests.integration.conftest import DEV_KEY

AUTH = {"Authorization": f"Bearer {DEV_KEY}"}
CHAT_BODY = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def http(mesh):
    with httpx.Client(base_url=mesh.edge_url, headers=AUTH, timeout=120) as session:
        yield session


@pytest.fixture(scope="module")
def gateway(mesh):
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


METADATA = (("authorization", f"Bearer {DEV_KEY}"),)


def test_rest_chat_json_has_no_empty_fields_openai_leaves_out(http):
    reply = http.post("/v1/chat/completions", json=CHAT_BODY)
    body = reply.json()
    assert reply.status_code == 200, body
    assert not {"system_fingerprint", "service_tier"} & body.keys()
    message = body["choices"][0]["message"]
    assert "tool_calls" not in message  # JS code tests `if (msg.tool_calls)`
    assert isinstance(message["content"], str)
    # Zeros OpenAI prints are still printed.
    assert body["choices"][0]["index"] == 0
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_rest_stream_chunks_have_no_empty_tool_calls(http):
    with http.stream("POST", "/v1/chat/completions", json={**CHAT_BODY, "stream": True}) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(event) for event in events if event != "[DONE]"]
    assert len(chunks) >= 2 and events[-1] == "[DONE]"
    for chunk in chunks:
        assert chunk["choices"][0]["index"] == 0
        assert "tool_calls" not in chunk["choices"][0]["delta"]
        assert "system_fingerprint" not in chunk


def test_rest_embeddings_are_openai_json_with_the_chat_headers(http):
    reply = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["a", "b"]})
    body = reply.json()
    assert reply.status_code == 200, body
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all("vector" not in item and len(item["embedding"]) == 384 for item in body["data"])
    assert reply.headers["x-request-id"]
    assert reply.headers["x-sophia-provider"] == "local"
    assert reply.headers["x-sophia-model"] == "all-minilm-l6-v2"
    assert reply.headers["x-sophia-cache"] == "bypass"
    assert reply.headers["x-sophia-attempts"] == "1"
    assert float(reply.headers["x-sophia-cost-usd"]) >= 0


def test_rest_model_listing_says_what_auto_means_and_carries_a_request_id(mesh, http):
    reply = http.get("/v1/models")
    assert reply.status_code == 200
    assert reply.headers["x-request-id"]
    models = {model["id"]: model for model in reply.json()["data"]}
    auto = models["auto"]
    assert auto["object"] == "model" and auto["kind"] == "chat" and "task_type" in auto["description"]
    assert auto["routes_to"] == ["smollm2-135m-instruct"]
    assert models["all-minilm-l6-v2"]["kind"] == "embedding"
    assert models["smollm2-135m-instruct"]["context_window"] == 8192
    client = openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=DEV_KEY, max_retries=0)
    retrieved = client.models.retrieve("auto")
    assert (retrieved.id, retrieved.owned_by) == ("auto", "sophia")


def test_rest_token_arrays_are_refused_for_a_model_that_embeds_text(mesh):
    client = openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=DEV_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="embeds text, not token ids") as raised:
        client.embeddings.create(model="all-minilm-l6-v2", input=[[1, 2, 3]])
    assert "input" in str(raised.value)


def test_grpc_callers_send_typed_text_and_stop_sequences(gateway):
    request = pb.CreateChatCompletionRequest(
        params=pb.ChatCompletionParams(
            model="auto",
            messages=[pb.ChatMessage(role="user", text="What is the capital of France?")],
            max_tokens=16,
            stop_sequences=["\n\n"],
        )
    )
    reply = gateway.CreateChatCompletion(request, metadata=METADATA, timeout=120)
    assert "paris" in reply.choices[0].message.content.lower()
    parts = pb.ChatMessage(role="user", parts=[pb.ContentPart(type="text", text="Say hi.")])
    request.params.ClearField("messages")
    request.params.messages.append(parts)
    assert gateway.CreateChatCompletion(request, metadata=METADATA, timeout=120).choices[0].message.content


def test_grpc_callers_get_typed_vectors_for_typed_texts(gateway):
    typed = gateway.CreateEmbeddings(
        pb.CreateEmbeddingsRequest(model="all-minilm-l6-v2", texts=["The cat sat.", "A dog ran."]),
        metadata=METADATA,
        timeout=60,
    )
    assert [len(item.vector) for item in typed.data] == [384, 384]
    assert not any(item.HasField("embedding") for item in typed.data)
    untyped = pb.CreateEmbeddingsRequest(model="all-minilm-l6-v2")
    untyped.input.string_value = "The cat sat."
    polymorphic = gateway.CreateEmbeddings(untyped, metadata=METADATA, timeout=60)
    values = [v.number_value for v in polymorphic.data[0].embedding.list_value.values]
    assert values == pytest.approx(list(typed.data[0].vector), abs=1e-6)


def test_grpc_typed_and_polymorphic_fields_are_exclusive(gateway):
    both = pb.CreateEmbeddingsRequest(model="all-minilm-l6-v2", texts=["a"])
    both.input.string_value = "b"
    with pytest.raises(grpc.RpcError) as raised:
        gateway.CreateEmbeddings(both, metadata=METADATA, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("texts:")
    tokens = pb.CreateEmbeddingsRequest(model="all-minilm-l6-v2", token_arrays=[pb.TokenArray(tokens=[1, 2])])
    with pytest.raises(grpc.RpcError) as raised:
        gateway.CreateEmbeddings(tokens, metadata=METADATA, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("token_arrays:")
