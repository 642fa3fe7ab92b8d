"""Bounded, seeded fuzzing of the public edge and of every service's gRPC API.

Whatever arrives — malformed JSON, wrong types, deep nesting, junk headers, random bytes, random field
values — the answer is a 2xx or a 4xx (REST) or a status other than INTERNAL / UNKNOWN (gRPC), no body
names an internal class, and every service is still SERVING afterwards. The mesh is this module's own,
so whatever the fuzzer creates (keys, budgets, usage) cannot disturb other tests.
"""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import httpx
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sophia.cache.v1 import cache_pb2
from sophia.gateway.v1 import admin_pb2, gateway_pb2
from sophia.inference.v1 import inference_pb2
from sophia.ledger.v1 import ledger_pb2
from sophia.router.v1 import router_pb2

from tests.integration.conftest import full_mesh_environ, start_full_mesh
from tests.support import internal_channel
from tools.mesh import SERVICES, Mesh

DEV_KEY = "sk-fuzz-dev-key-0001"
ADMIN_KEY = "sk-fuzz-admin-key-0001"
FUZZ = settings(
    max_examples=120,
    derandomize=True,  # seeded: the same cases every run, so a failure reproduces
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
# What must never reach a client: Python exception names, tracebacks, module paths, object reprs.
INTERNAL_NAMES = re.compile(
    r"Traceback|Exception\b|Error\(|\b(Key|Type|Value|Attribute|Runtime|Index|Decode)Error\b"
    r"|_pb2|\bgrpc\._|\.py\b|object at 0x|sophia\.(gateway|router|cache|ledger|inference)\.v1\.\w+Servicer"
)
REFUSED_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def fuzz_mesh(tmp_path_factory):
    running = start_full_mesh(
        tmp_path_factory.mktemp("fuzz-mesh"), full_mesh_environ(tmp_path_factory, DEV_KEY, ADMIN_KEY)
    )
    try:
        yield running
    finally:
        running.stop_all()


# --- JSON the way a hostile or careless client writes it ------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-38, -1e-38, 1e308, 0.5, 2.0001]),
    st.text(max_size=40),
    st.sampled_from(["", "auto", "user", "system", "tool", "\x00", "\ud7ff", "é" * 300, "a" * 70_000]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int, leaf) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


def tool_with_parameters(parameters) -> list:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


deep_values = st.builds(nested, st.integers(min_value=20, max_value=120), scalars)
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "robot", ""])},
            optional={
                "content": st.one_of(
                    st.text(max_size=60),
                    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})),
                    json_values,
                    deep_values,
                ),
                "name": json_values,
                "tool_call_id": st.text(max_size=10),
                "tool_calls": json_values,
            },
        ),
        max_size=3,
    )
    | json_values
)

CHAT_FIELDS = {
    "model": st.sampled_from(["auto", "smollm2-135m-instruct", "all-minilm-l6-v2", "nope", "m" * 65_536])
    | json_values,
    "temperature": json_values,
    "top_p": json_values,
    "stop": json_values | deep_values,
    "n": json_values,
    "seed": json_values,
    "stream": st.booleans() | json_values,
    "stream_options": json_values,
    "tools": json_values
    | st.builds(lambda d: [{"type": "function", "function": {"name": "f", "parameters": d}}], deep_values),
    "tool_choice": json_values,
    "logit_bias": json_values,
    "metadata": json_values,
    "response_format": json_values,
    "user": json_values,
    "cache": json_values,
    "task_type": json_values,
    "model_preference": json_values,
    "logprobs": json_values,
    "presence_penalty": json_values,
    "unknown_field": json_values,
}
chat_bodies = st.fixed_dictionaries(
    {"messages": messages, "max_tokens": st.sampled_from([1, 2, 0, -5, 2**31, "3", None])},
    optional=CHAT_FIELDS,
)
embedding_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["all-minilm-l6-v2", "smollm2-135m-instruct", "x" * 65_536]) | json_values,
        "input": json_values | deep_values | st.lists(st.integers(-5, 70_000), max_size=5),
        "encoding_format": json_values,
        "dimensions": json_values,
        "user": json_values,
    },
)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": "auto"', b"\xff\xfe{}", b'{"a":' * 200]),
)
junk_headers = st.dictionaries(
    st.sampled_from(["grpc-timeout", "x-request-id", "cache-control", "content-type", "te", "x-envoy-foo"]),
    st.sampled_from(
        [
            "abc",
            "1",
            "S",
            "1.5S",
            "10S",
            "99999999H",
            "",
            "x" * 300,
            "application/grpc",
            "trailers",
            "no-cache",
        ]
    ),
    max_size=3,
)
PATHS = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/smollm2-135m-instruct",
        "/admin/v1/keys",
        "/admin/v1/keys/key_nope",
        "/admin/v1/tenants/dev/budget",
        "/admin/v1/tenants/dev/usage?group_by=day&start_time=x",
        "/sophia.gateway.v1.GatewayService/CreateChatCompletion",
        "/v1/../../etc/passwd",
        "/%ff%00",
        "/" + "a" * 5000,
    ]
)


def check_http(reply: httpx.Response) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:500])
    assert not INTERNAL_NAMES.search(reply.text), reply.text[:500]


@pytest.fixture(scope="module")
def edge(fuzz_mesh):
    with httpx.Client(base_url=fuzz_mesh.edge_url, timeout=60) as client:
        yield client


def _post(edge: httpx.Client, path: str, body, headers: dict[str, str], key: str = DEV_KEY) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"authorization": f"Bearer {key}", "content-type": "application/json", **headers}
    check_http(edge.post(path, content=content, headers=sent))


@FUZZ
@given(body=chat_bodies, headers=junk_headers)
def test_chat_completions_never_answer_5xx(edge, body, headers):
    _post(edge, "/v1/chat/completions", body, headers)


@FUZZ
@given(body=embedding_bodies, headers=junk_headers)
def test_embeddings_never_answer_5xx(edge, body, headers):
    _post(edge, "/v1/embeddings", body, headers)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    path=PATHS,
    body=raw_bodies | json_values.map(lambda v: json.dumps(v).encode()),
    headers=junk_headers,
    key=st.sampled_from([DEV_KEY, ADMIN_KEY, "", "sk-sophia-forged", "Bearer"]),
)
def test_any_endpoint_method_and_body_never_answer_5xx(edge, method, path, body, headers, key):
    sent = {"content-type": "application/json", **headers}
    if key:
        sent["authorization"] = f"Bearer {key}"
    check_http(edge.request(method, path, content=body, headers=sent))


# --- gRPC: every method of every service, random bytes and random well-typed messages -------------

SERVICES_UNDER_TEST = {
    "gateway": (gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"], gateway_pb2),
    "admin": (admin_pb2.DESCRIPTOR.services_by_name["AdminService"], admin_pb2),
    "router": (router_pb2.DESCRIPTOR.services_by_name["RouterService"], router_pb2),
    "cache": (cache_pb2.DESCRIPTOR.services_by_name["CacheService"], cache_pb2),
    "ledger": (ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"], ledger_pb2),
    "inference": (inference_pb2.DESCRIPTOR.services_by_name["InferenceService"], inference_pb2),
}
METHODS = [(name, method) for name, (service, _) in SERVICES_UNDER_TEST.items() for method in service.methods]
FIELD_VALUES = {
    "string": st.text(max_size=30) | st.sampled_from(["", "dev", "auto", "x" * 70_000, "a:b*[?]", "{x}"]),
    "int": st.sampled_from([0, 1, -1, 2, 3, 7, 2**31 - 1, -(2**31)]),
    "uint": st.sampled_from([0, 1, 2, 2**32 - 1]),
    "int64": st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 1_700_000_000]),
    "float": st.floats(width=32) | st.sampled_from([1e-38, -1.0, 0.0, 2.5]),
    "double": st.floats() | st.sampled_from([1e-38, -1.0, 0.0, 1e12]),
    "bool": st.booleans(),
    "bytes": st.binary(max_size=64),
}
_KIND = {
    1: "double", 2: "float", 3: "int64", 4: "uint", 5: "int", 6: "uint", 7: "uint", 8: "bool",
    9: "string", 12: "bytes", 13: "uint", 15: "int", 16: "int64", 17: "int", 18: "int64",
}  # fmt: skip


@st.composite
def random_message(draw, message_class, depth: int = 0):
    message = message_class()
    for field in message.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None:
            if depth >= 3 or field.message_type.full_name.startswith("google.protobuf"):
                continue
            if field.message_type.GetOptions().map_entry:
                key_kind = _KIND[field.message_type.fields_by_name["key"].type]
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    continue
                entries = draw(
                    st.dictionaries(FIELD_VALUES[key_kind], FIELD_VALUES[_KIND[value_field.type]], max_size=3)
                )
                getattr(message, field.name).update(entries)
                continue
            child_class = message_factory.GetMessageClass(field.message_type)
            if _repeated(field):
                for _ in range(draw(st.integers(0, 2))):
                    getattr(message, field.name).add().CopyFrom(draw(random_message(child_class, depth + 1)))
            else:
                getattr(message, field.name).CopyFrom(draw(random_message(child_class, depth + 1)))
            continue
        if field.enum_type is not None:
            values = st.sampled_from([v.number for v in field.enum_type.values] + [99, -1])
        else:
            values = FIELD_VALUES[_KIND[field.type]]
        if _repeated(field):
            getattr(message, field.name).extend(draw(st.lists(values, max_size=3)))
        else:
            setattr(message, field.name, draw(values))
    return message


def _repeated(field) -> bool:
    return field.is_repeated


# Server streams that never end by themselves: the first message is enough.
SUBSCRIPTIONS = {"WatchRoutes"}


def _cheap(service: str, method: str, request) -> None:
    """Keeps a random generation request short: the local model would otherwise write for seconds."""
    if service == "inference" and method.startswith("Generate") and request.options.max_tokens > 4:
        request.options.max_tokens = 4
    if service == "gateway" and "Chat" in method:
        if not request.params.HasField("max_tokens") or request.params.max_tokens > 4:
            request.params.max_tokens = 2
        request.params.ClearField("max_completion_tokens")


async def _call(mesh: Mesh, service: str, method, payload: bytes) -> None:
    target = "gateway" if service in ("gateway", "admin") else service
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {ADMIN_KEY if service == 'admin' else DEV_KEY}"),)
    # The Gateway's public port takes API keys over plaintext; the internal services take mTLS callers.
    if target == "gateway":
        channel = grpc.aio.insecure_channel(mesh.address("gateway"))
    else:
        channel = internal_channel(mesh, target)
    async with channel:
        if method.server_streaming:
            call = channel.unary_stream(path)(payload, metadata=metadata, timeout=20)
            try:
                async for _ in call:
                    if method.name in SUBSCRIPTIONS:
                        call.cancel()  # it answered; a subscription would go on until its deadline
                        break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() not in REFUSED_GRPC, (path, exc.code(), exc.details())
                assert not INTERNAL_NAMES.search(exc.details() or ""), exc.details()
            return
        try:
            await channel.unary_unary(path)(payload, metadata=metadata, timeout=20)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() not in REFUSED_GRPC, (path, exc.code(), exc.details())
            assert not INTERNAL_NAMES.search(exc.details() or ""), exc.details()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_every_rpc_survives_random_bytes_and_random_messages(fuzz_mesh, service, method):
    module = SERVICES_UNDER_TEST[service][1]
    request_class = getattr(module, method.input_type.name)

    @settings(FUZZ, max_examples=25)
    @given(
        payload=st.binary(max_size=64)
        | st.sampled_from([b"\x0a\x02\xff\xfe", b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x12\x05ab"]),
        message=random_message(request_class),
    )
    def fuzz(payload, message):
        _cheap(service, method.name, message)
        asyncio.run(_call(fuzz_mesh, service, method, payload))
        asyncio.run(_call(fuzz_mesh, service, method, message.SerializeToString()))

    fuzz()


def test_every_service_is_still_serving_after_the_fuzzing(fuzz_mesh):
    async def check(service: str) -> int:
        if service == "gateway":
            channel = grpc.aio.insecure_channel(fuzz_mesh.address("gateway"))
        else:
            channel = internal_channel(fuzz_mesh, service)
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            return reply.status

    for service in SERVICES:
        assert asyncio.run(check(service)) == health_pb2.HealthCheckResponse.SERVING, service
        assert fuzz_mesh.processes[service].poll() is None, f"{service} exited"
