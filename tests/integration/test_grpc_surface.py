"""The mesh over gRPC: reflection and health for every service with grpcurl, a Node.js client, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from libs.config import REPO_ROOT
from tests.integration.conftest import DEV_KEY
from tests.support import grpcurl_security, internal_channel
from tools.mesh import SERVICES

GRPCURL = str(REPO_ROOT / ".venv" / "bin" / "grpcurl")
SERVICE_NAMES = {
    "gateway": "sophia.gateway.v1.GatewayService",
    "router": "sophia.router.v1.RouterService",
    "cache": "sophia.cache.v1.CacheService",
    "ledger": "sophia.ledger.v1.LedgerService",
    "inference": "sophia.inference.v1.InferenceService",
}


def grpcurl(*args: str, security: Sequence[str] = ("-plaintext",)) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, *security, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("service", SERVICES)
def test_reflection_lists_and_describes_each_service(mesh, service):
    security = grpcurl_security(mesh, service)
    listed = grpcurl(mesh.address(service), "list", security=security)
    assert listed.returncode == 0, listed.stderr
    assert SERVICE_NAMES[service] in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = grpcurl(mesh.address(service), "describe", SERVICE_NAMES[service], security=security)
    assert described.returncode == 0, described.stderr
    assert "rpc " in described.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_health_check_says_serving_for_each_service(mesh, service):
    for name in ("", SERVICE_NAMES[service]):
        checked = grpcurl(
            "-d",
            json.dumps({"service": name}),
            mesh.address(service),
            "grpc.health.v1.Health/Check",
            security=grpcurl_security(mesh, service),
        )
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["status"] == "SERVING"


def test_grpcurl_chat_through_reflection_returns_response_metadata(mesh):
    called = grpcurl(
        "-v",
        "-H",
        f"authorization: Bearer {DEV_KEY}",
        "-H",
        "x-request-id: grpcurl-test-1",
        "-d",
        json.dumps(
            {
                "params": {
                    "model": "auto",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Say hello"}],
                }
            }
        ),
        mesh.address("gateway"),
        "sophia.gateway.v1.GatewayService/CreateChatCompletion",
    )
    assert called.returncode == 0, called.stderr
    assert "x-request-id: grpcurl-test-1" in called.stdout
    assert "x-sophia-provider: local" in called.stdout
    assert '"chatcmpl-grpcurl-test-1"' in called.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_nodejs_grpc_client_calls_the_gateway(mesh):
    script = REPO_ROOT / "tests" / "node" / "chat_client.js"
    ran = subprocess.run(
        ["node", str(script), mesh.address("gateway"), DEV_KEY, "Name a colour."],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    response = json.loads(ran.stdout)
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"].strip()
    assert response["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
async def gateway(mesh):
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


def chat(**params) -> gateway_pb2.CreateChatCompletionRequest:
    request = gateway_pb2.CreateChatCompletionRequest()
    request.params.model = params.pop("model", "auto")
    for message in params.pop("messages", [{"role": "user", "content": "hi"}]):
        added = request.params.messages.add(role=message["role"])
        added.content.string_value = message["content"]
    for name, value in params.items():
        if isinstance(value, list):
            getattr(request.params, name).extend(value)
        else:
            setattr(request.params, name, value)
    return request


AUTH = (("authorization", f"Bearer {DEV_KEY}"),)
GRPC_ERRORS = [
    ("empty messages", chat(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (
        "unknown role",
        chat(messages=[{"role": "robot", "content": "x"}]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].role",
    ),
    ("negative max_tokens", chat(max_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("temperature", chat(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("unknown model", chat(model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    ("embedding model for chat", chat(model="all-minilm-l6-v2"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ("missing model", chat(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ("stream flag on the unary RPC", chat(stream=True), grpc.StatusCode.INVALID_ARGUMENT, "stream"),
    (
        "tools on the local model",
        chat(tools=[gateway_pb2.Tool(type="function", function={"name": "f"})]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tools",
    ),
]


@pytest.mark.parametrize(("case", "request_", "code", "field"), GRPC_ERRORS, ids=[c[0] for c in GRPC_ERRORS])
async def test_bad_input_over_grpc_gets_the_matching_status(gateway, case, request_, code, field):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gateway.CreateChatCompletion(request_, metadata=AUTH, timeout=30)
    assert raised.value.code() == code
    assert field in raised.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert bad_request_fields(raised.value) == [field]


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields of the google.rpc.BadRequest detail in the status (grpc-status-details-bin), decoded
    here with the plain protobuf messages, as any client language would."""
    encoded = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert encoded, f"no status details on {error.code().name}: {error.details()}"
    status = status_pb2.Status.FromString(encoded)
    assert status.code == error.code().value[0] and status.message == error.details()
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request), detail.type_url
        fields += [violation.field for violation in bad_request.field_violations]
    return fields


async def test_internal_services_send_field_violations_too(mesh):
    async with internal_channel(mesh, "ledger") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await ledger_pb2_grpc.LedgerServiceStub(channel).CheckBudget(
                ledger_pb2.CheckBudgetRequest(tenant_id=""), timeout=10
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(raised.value) == ["tenant_id"]


@pytest.mark.parametrize("service", ["gateway", "router"])
@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_v1_and_v1alpha_both_answer(mesh, service, version):
    """Current tools ask grpc.reflection.v1 first, older ones v1alpha: both list the services."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    channel = grpc.aio.insecure_channel(mesh.address(service)) if service == "gateway" else None
    async with channel or internal_channel(mesh, service, "operator") as channel:
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([request]), timeout=10)
        replies = [reply async for reply in call]
    listed = {entry.name for entry in replies[0].list_services_response.service}
    assert SERVICE_NAMES[service] in listed
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= listed


def test_grpcurl_describes_reflection_v1(mesh):
    described = grpcurl(mesh.address("gateway"), "describe", "grpc.reflection.v1.ServerReflection")
    assert described.returncode == 0, described.stderr
    assert "ServerReflectionInfo" in described.stdout


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer sk-nope-nope-nope"),)])
async def test_no_or_wrong_key_is_unauthenticated(gateway, metadata):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
