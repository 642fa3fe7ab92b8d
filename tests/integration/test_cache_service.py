"""The cache service as a real process over gRPC (mTLS), backed by a real Redis, with its real model."""

from __future__ import annotations

import os
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sophia.cache.v1 import cache_pb2 as pb
from sophia.cache.v1 import cache_pb2_grpc

from tests.support import internal_blocking_channel, mesh_environ
from tools.mesh import Mesh
from tools.ports import free_port

pytestmark = pytest.mark.integration

MAX_ENTRY_BYTES = 1024
ENTRY_LIMIT = 5
CONFIG = {
    "SOPHIA__CACHE__MAX_ENTRY_BYTES": str(MAX_ENTRY_BYTES),
    "SOPHIA__CACHE__MAX_ENTRIES_PER_TENANT": str(ENTRY_LIMIT),
    "SOPHIA__CACHE__MAX_QUESTION_CHARS": "2000",
}
RPC_TIMEOUT = 20
SCOPE = '{"model":"m1","history":"none"}'
FRANCE = "What is the capital of France?"


def _start(state_dir, environ) -> Mesh:
    mesh = Mesh(state_dir, environ)
    try:
        for component in ("redis", "cache"):
            mesh.start(component)
            mesh.wait_ready([component], timeout=120)
    except BaseException:
        mesh.stop_all()
        raise
    return mesh


@pytest.fixture(scope="module")
def environ():
    return mesh_environ(CONFIG)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, environ):
    mesh = _start(tmp_path_factory.mktemp("cache"), environ)
    yield mesh
    mesh.stop_all()


@pytest.fixture(scope="module")
def stub(mesh):
    with internal_blocking_channel(mesh, "cache") as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


@pytest.fixture
def tenant():
    """A fresh tenant per test, so counters and entries of other tests never show up."""
    return f"tenant-{uuid.uuid4().hex[:8]}"


def store(
    stub, tenant_id, question, response=b'{"answer":"Paris"}', *, model="m1", scope=SCOPE, ttl=0, **extra
):
    return stub.Store(
        pb.StoreRequest(
            tenant_id=tenant_id, model=model, scope=scope, question=question, response=response,
            ttl_seconds=ttl, semantic=extra.pop("semantic", True), **extra,
        ),
        timeout=RPC_TIMEOUT,
    )  # fmt: skip


def lookup(
    stub, tenant_id, question, *, model="m1", scope=SCOPE, semantic=True, **extra
) -> pb.LookupResponse:
    return stub.Lookup(
        pb.LookupRequest(
            tenant_id=tenant_id, model=model, scope=scope, question=question, semantic=semantic, **extra
        ),
        timeout=RPC_TIMEOUT,
    )


def test_exact_hit_on_the_normalised_question(stub, tenant):
    store(stub, tenant, FRANCE, b"\x00raw\xffbytes")
    reply = lookup(stub, tenant, "  what is the CAPITAL of france ?? ")
    assert (reply.result, reply.layer) == (pb.CACHE_RESULT_HIT, pb.CACHE_LAYER_EXACT)
    assert reply.response == b"\x00raw\xffbytes"


def test_semantic_hit_returns_layer_similarity_and_the_embedding(stub, tenant):
    store(stub, tenant, FRANCE)
    reply = lookup(stub, tenant, "Tell me France's capital city.")
    assert (reply.result, reply.layer) == (pb.CACHE_RESULT_HIT, pb.CACHE_LAYER_SEMANTIC)
    assert reply.response == b'{"answer":"Paris"}'
    assert 0.57 <= reply.similarity < 1
    assert len(reply.embedding) == 384
    assert abs(sum(v * v for v in reply.embedding) - 1) < 1e-3
    # The vector comes back and is taken as given: the same answer, without embedding again.
    again = lookup(stub, tenant, "Tell me France's capital city.", embedding=reply.embedding)
    assert again.layer == pb.CACHE_LAYER_SEMANTIC and again.similarity == pytest.approx(reply.similarity)


def test_exact_only_requests_get_no_semantic_hit(stub, tenant):
    store(stub, tenant, FRANCE)
    reply = lookup(stub, tenant, "Tell me France's capital city.", semantic=False)
    assert reply.result == pb.CACHE_RESULT_MISS
    assert not reply.embedding  # nothing was embedded


@pytest.mark.parametrize(
    ("cached", "asked", "veto"),
    [
        (
            "Which vitamins are water-soluble?",
            "Which vitamins are NOT water-soluble?",
            pb.VETO_REASON_NEGATION,
        ),
        ("Reset the PIN for account 48231", "Reset the PIN for account 48213", pb.VETO_REASON_NUMBER),
    ],
)
def test_negation_and_number_pairs_are_not_hit(stub, tenant, cached, asked, veto):
    store(stub, tenant, cached)
    reply = lookup(stub, tenant, asked)
    assert reply.result == pb.CACHE_RESULT_MISS
    assert reply.veto == veto and reply.similarity > 0.8
    stats = stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
    assert [(v.reason, v.count) for v in stats.vetoes] == [(veto, 1)]


def test_tenants_never_see_each_others_entries(stub, tenant):
    store(stub, tenant, FRANCE)
    for other in (f"{tenant}-other", f"{tenant}:m1", tenant.upper()):
        assert lookup(stub, other, FRANCE).result == pb.CACHE_RESULT_MISS
        assert lookup(stub, other, "Tell me France's capital city.").result == pb.CACHE_RESULT_MISS


@pytest.mark.parametrize(
    ("model", "scope"),
    [
        ("m2", SCOPE),
        ("m1", '{"model":"m1","history":"system: answer in French"}'),
        ("m1", '{"model":"m1","history":"none","temperature":0.2}'),
    ],
)
def test_other_model_or_scope_never_hits(stub, tenant, model, scope):
    store(stub, tenant, FRANCE)
    assert lookup(stub, tenant, FRANCE, model=model, scope=scope).result == pb.CACHE_RESULT_MISS
    assert lookup(stub, tenant, "capital of France?", model=model, scope=scope).result == pb.CACHE_RESULT_MISS


def test_truncated_answers_are_served_only_to_the_same_question(stub, tenant):
    store(stub, tenant, FRANCE, answer_end=pb.ANSWER_END_TRUNCATED)
    assert lookup(stub, tenant, FRANCE).layer == pb.CACHE_LAYER_EXACT
    reply = lookup(stub, tenant, "Tell me France's capital city.")
    assert (reply.result, reply.veto) == (pb.CACHE_RESULT_MISS, pb.VETO_REASON_TRUNCATED)


def test_entries_expire_from_both_layers(stub, tenant):
    store(stub, tenant, FRANCE, ttl=1)
    assert lookup(stub, tenant, "Tell me France's capital city.").layer == pb.CACHE_LAYER_SEMANTIC
    time.sleep(1.3)
    assert lookup(stub, tenant, FRANCE).result == pb.CACHE_RESULT_MISS
    assert lookup(stub, tenant, "Tell me France's capital city.").result == pb.CACHE_RESULT_MISS
    assert stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT).entries == 0


def test_the_entry_limit_evicts_the_soonest_to_expire(stub, tenant):
    questions = [f"How tall is building number {n}?" for n in range(ENTRY_LIMIT + 2)]
    evicted = [store(stub, tenant, question, ttl=100 + n).evicted for n, question in enumerate(questions)]
    assert evicted == [0] * ENTRY_LIMIT + [1, 1]
    stats = stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
    assert (stats.entries, stats.indexed_entries) == (ENTRY_LIMIT, ENTRY_LIMIT)
    assert [lookup(stub, tenant, q).result for q in questions[:2]] == [pb.CACHE_RESULT_MISS] * 2
    assert all(lookup(stub, tenant, q).layer == pb.CACHE_LAYER_EXACT for q in questions[2:])


def test_invalidate_clears_both_layers_of_one_model(stub, tenant):
    store(stub, tenant, FRANCE, model="m1")
    store(stub, tenant, "How many legs does a spider have?", model="m1")
    store(stub, tenant, FRANCE, model="m2")
    reply = stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="m1"), timeout=RPC_TIMEOUT)
    assert reply.removed == 2
    assert lookup(stub, tenant, FRANCE).result == pb.CACHE_RESULT_MISS
    assert lookup(stub, tenant, "Tell me France's capital city.").result == pb.CACHE_RESULT_MISS
    assert lookup(stub, tenant, FRANCE, model="m2").layer == pb.CACHE_LAYER_EXACT
    assert stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant), timeout=RPC_TIMEOUT).removed == 1
    assert stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT).indexed_entries == 0


def test_invalidate_removes_the_answers_a_model_gave_under_another_requested_model(stub, tenant):
    """After a fallback the Gateway stores the answer under the model requested, with the model that gave it
    in the response: invalidating the answering model must remove it too."""
    fallback_answer = b'{"model_id": "good-gpt", "provider": "good", "completion": {"content": "Paris"}}'
    store(stub, tenant, FRANCE, fallback_answer, model="fail500-gpt")
    store(stub, f"{tenant}-other", FRANCE, fallback_answer, model="fail500-gpt")
    assert lookup(stub, tenant, FRANCE, model="fail500-gpt").layer == pb.CACHE_LAYER_EXACT
    reply = stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="good-gpt"), timeout=RPC_TIMEOUT)
    assert reply.removed == 1
    assert lookup(stub, tenant, FRANCE, model="fail500-gpt").result == pb.CACHE_RESULT_MISS
    assert lookup(stub, tenant, "Tell me France's capital city.", model="fail500-gpt").result == (
        pb.CACHE_RESULT_MISS
    )
    assert stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT).indexed_entries == 0
    # Another tenant's answer by the same model stays.
    assert lookup(stub, f"{tenant}-other", FRANCE, model="fail500-gpt").layer == pb.CACHE_LAYER_EXACT


def test_stats_count_hits_by_layer_and_misses(stub, tenant):
    store(stub, tenant, FRANCE)
    lookup(stub, tenant, FRANCE)
    lookup(stub, tenant, "Tell me France's capital city.")
    lookup(stub, tenant, "How do I bake bread?")
    stats = stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
    assert (stats.hits, stats.exact_hits, stats.semantic_hits, stats.misses) == (2, 1, 1, 1)
    assert (stats.entries, stats.indexed_entries) == (1, 1)


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [
        ("Lookup", pb.LookupRequest(model="m", question="q"), "tenant_id"),
        ("Lookup", pb.LookupRequest(tenant_id="bad tenant", model="m", question="q"), "tenant_id"),
        ("Lookup", pb.LookupRequest(tenant_id="t", question="q"), "model"),
        ("Lookup", pb.LookupRequest(tenant_id="t", model="m", question="  ?  "), "question"),
        ("Lookup", pb.LookupRequest(tenant_id="t", model="m", question="q" * 2001), "question"),
        ("Lookup", pb.LookupRequest(tenant_id="t", model="m", question="q", embedding=[0.5] * 4),
         "embedding"),
        ("Store", pb.StoreRequest(tenant_id="t", model="m", question="q"), "response"),
        ("Store", pb.StoreRequest(tenant_id="t", model="m", response=b"r"), "question"),
        ("Store", pb.StoreRequest(tenant_id="t", model="m", question="q", response=b"r", ttl_seconds=-1),
         "ttl_seconds"),
        ("Store", pb.StoreRequest(tenant_id="t", model="m", question="q", response=b"r" * 2000), "response"),
        ("Store", pb.StoreRequest(tenant_id="t", model="m", question="q", response=b"r", embedding=[1.0] * 9),
         "embedding"),
        ("Invalidate", pb.InvalidateRequest(model="m"), "tenant_id"),
        ("Stats", pb.StatsRequest(tenant_id="a\tb"), "tenant_id"),
    ],
)  # fmt: skip
def test_invalid_requests_name_the_field(stub, method, request_message, field):
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request_message, timeout=RPC_TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}:")


# --- processes: restart, replicas, Redis outages (each test gets its own Redis and cache) ---------------


@pytest.fixture
def fresh_mesh(tmp_path):
    mesh = _start(tmp_path, mesh_environ(CONFIG))
    yield mesh
    mesh.stop_all()


def test_sigkill_and_restart_finds_every_entry(fresh_mesh):
    questions = [FRANCE, "How many legs does a spider have?", "Who wrote Hamlet?"]
    with internal_blocking_channel(fresh_mesh, "cache") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        for question in questions:
            store(stub, "t", question)
    os.kill(fresh_mesh.processes["cache"].pid, signal.SIGKILL)
    fresh_mesh.processes["cache"].wait(timeout=10)
    fresh_mesh.start("cache")
    fresh_mesh.wait_ready(["cache"], timeout=120)
    with internal_blocking_channel(fresh_mesh, "cache") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        assert all(lookup(stub, "t", q).layer == pb.CACHE_LAYER_EXACT for q in questions)
        assert lookup(stub, "t", "Tell me France's capital city.").layer == pb.CACHE_LAYER_SEMANTIC
        assert stub.Stats(pb.StatsRequest(tenant_id="t"), timeout=RPC_TIMEOUT).indexed_entries == 3


def test_two_replicas_see_each_others_stores_within_a_second(fresh_mesh, tmp_path):
    environ = dict(fresh_mesh.environ, SOPHIA__SERVICES__CACHE__PORT=str(free_port()))
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = "0"
    second = Mesh(tmp_path / "second", environ)
    second.start("cache")
    try:
        second.wait_ready(["cache"], timeout=120)
        with (
            internal_blocking_channel(fresh_mesh, "cache") as first_channel,
            internal_blocking_channel(second, "cache") as second_channel,
        ):
            first, other = (cache_pb2_grpc.CacheServiceStub(c) for c in (first_channel, second_channel))
            for writer, reader, question in ((first, other, FRANCE), (other, first, "Who wrote Hamlet?")):
                store(writer, "t", question)
                stored_at = time.monotonic()
                paraphrase = (
                    "Tell me France's capital city." if question == FRANCE else "Who is the author of Hamlet?"
                )
                while lookup(reader, "t", paraphrase).layer != pb.CACHE_LAYER_SEMANTIC:
                    assert time.monotonic() - stored_at < 1.0, "the other replica did not see the store"
                    time.sleep(0.02)
            first.Invalidate(pb.InvalidateRequest(tenant_id="t"), timeout=RPC_TIMEOUT)
            invalidated_at = time.monotonic()
            while lookup(other, "t", "Tell me France's capital city.").result != pb.CACHE_RESULT_MISS:
                assert time.monotonic() - invalidated_at < 1.0
                time.sleep(0.02)
    finally:
        second.stop_all()


def _health(mesh: Mesh) -> int | None:
    with internal_blocking_channel(mesh, "cache") as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            )
        except grpc.RpcError:
            return None


def test_not_serving_until_redis_answers(tmp_path):
    mesh = Mesh(tmp_path, mesh_environ(CONFIG))
    try:
        mesh.start("cache")
        deadline = time.monotonic() + 60
        while (status := _health(mesh)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(1)
        assert _health(mesh) == health_pb2.HealthCheckResponse.NOT_SERVING
        mesh.start("redis")
        mesh.wait_ready(["cache"], timeout=120)
        with internal_blocking_channel(mesh, "cache") as channel:
            assert lookup(cache_pb2_grpc.CacheServiceStub(channel), "t", "k").result == pb.CACHE_RESULT_MISS
    finally:
        mesh.stop_all()


def test_unavailable_not_a_hang_when_redis_freezes(fresh_mesh):
    redis_pid = fresh_mesh.processes["redis"].pid
    with internal_blocking_channel(fresh_mesh, "cache") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        assert lookup(stub, "t", "k").result == pb.CACHE_RESULT_MISS
        os.kill(redis_pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as raised:
                lookup(stub, "t", "k")
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < RPC_TIMEOUT / 2
        assert lookup(stub, "t", "k").result == pb.CACHE_RESULT_MISS
