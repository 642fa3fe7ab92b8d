"""The cache service as a real process over gRPC, backed by a real Redis."""

from __future__ import annotations

import os
import signal
import time
import uuid

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sophia.cache.v1 import cache_pb2 as pb
from sophia.cache.v1 import cache_pb2_grpc

from services.cache import keys
from tests.support import internal_blocking_channel, mesh_environ
from tools.mesh import Mesh

pytestmark = pytest.mark.integration

DEFAULT_TTL = 777
MAX_ENTRY_BYTES = 1024
CONFIG = {
    "SOPHIA__CACHE__TTL_SECONDS": str(DEFAULT_TTL),
    "SOPHIA__CACHE__MAX_ENTRY_BYTES": str(MAX_ENTRY_BYTES),
}
RPC_TIMEOUT = 10


def _start(state_dir) -> Mesh:
    mesh = Mesh(state_dir, mesh_environ(CONFIG))
    try:
        for component in ("redis", "cache"):
            mesh.start(component)
            mesh.wait_ready([component], timeout=60)
    except BaseException:
        mesh.stop_all()
        raise
    return mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = _start(tmp_path_factory.mktemp("cache"))
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


def store(stub, tenant_id, request_key, response=b'{"answer":"Paris"}', model="m1", ttl_seconds=0):
    stub.Store(
        pb.StoreRequest(
            tenant_id=tenant_id,
            model=model,
            request_key=request_key,
            response=response,
            ttl_seconds=ttl_seconds,
        ),
        timeout=RPC_TIMEOUT,
    )


def lookup(stub, tenant_id, request_key, model="m1") -> pb.LookupResponse:
    return stub.Lookup(
        pb.LookupRequest(tenant_id=tenant_id, model=model, request_key=request_key), timeout=RPC_TIMEOUT
    )


def test_store_then_exact_hit(stub, tenant):
    store(stub, tenant, '{"messages":[{"role":"user","content":"capital of France?"}]}', b"\x00raw\xffbytes")
    reply = lookup(stub, tenant, '{"messages":[{"role":"user","content":"capital of France?"}]}')
    assert reply.result == pb.CACHE_RESULT_EXACT_HIT
    assert reply.response == b"\x00raw\xffbytes"


def test_other_request_key_misses(stub, tenant):
    store(stub, tenant, '{"temperature":0}')
    reply = lookup(stub, tenant, '{"temperature":0.5}')
    assert reply.result == pb.CACHE_RESULT_MISS
    assert reply.response == b""


def test_tenants_never_see_each_others_entries(stub, tenant):
    store(stub, tenant, "shared-key")
    for other in (f"{tenant}-other", f"{tenant}:m1", tenant.upper()):
        assert lookup(stub, other, "shared-key").result == pb.CACHE_RESULT_MISS
    # "tenant" + model "x:m1" must not land where tenant "tenant:x" + model "m1" is.
    store(stub, f"{tenant}:x", "k", b"x-tenant")
    assert lookup(stub, tenant, "k", model="x:m1").result == pb.CACHE_RESULT_MISS


def test_models_are_separate_namespaces(stub, tenant):
    store(stub, tenant, "k", b"from m1", model="m1")
    store(stub, tenant, "k", b"from m2", model="m2")
    assert lookup(stub, tenant, "k", model="m1").response == b"from m1"
    assert lookup(stub, tenant, "k", model="m2").response == b"from m2"
    assert lookup(stub, tenant, "k", model="m3").result == pb.CACHE_RESULT_MISS


def test_entries_expire_with_their_ttl(stub, tenant):
    store(stub, tenant, "short-lived", ttl_seconds=1)
    assert lookup(stub, tenant, "short-lived").result == pb.CACHE_RESULT_EXACT_HIT
    time.sleep(1.3)
    assert lookup(stub, tenant, "short-lived").result == pb.CACHE_RESULT_MISS
    assert stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT).entries == 0


def test_ttl_zero_uses_the_configured_default(mesh, stub, tenant):
    store(stub, tenant, "k", ttl_seconds=0)
    store(stub, tenant, "k2", ttl_seconds=90)
    with redis.Redis.from_url(mesh.config.redis.url) as client:
        assert DEFAULT_TTL - 5 <= client.ttl(keys.exact_key(tenant, "m1", "k")) <= DEFAULT_TTL
        assert 85 <= client.ttl(keys.exact_key(tenant, "m1", "k2")) <= 90


def test_invalidate_one_model(stub, tenant):
    store(stub, tenant, "a", model="m1")
    store(stub, tenant, "b", model="m1")
    store(stub, tenant, "a", model="m2")
    reply = stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="m1"), timeout=RPC_TIMEOUT)
    assert reply.removed == 2
    assert lookup(stub, tenant, "a", model="m1").result == pb.CACHE_RESULT_MISS
    assert lookup(stub, tenant, "b", model="m1").result == pb.CACHE_RESULT_MISS
    assert lookup(stub, tenant, "a", model="m2").result == pb.CACHE_RESULT_EXACT_HIT
    again = stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="m1"), timeout=RPC_TIMEOUT)
    assert again.removed == 0


def test_invalidate_whole_tenant_spares_other_tenants(stub, tenant):
    for model in ("m1", "m2", "m3"):
        store(stub, tenant, "k", model=model)
    # Tenant ids that a raw-id namespace or SCAN pattern would confuse with this tenant.
    neighbours = (f"{tenant}:m1", f"{tenant}*", f"{tenant}x")
    for neighbour in neighbours:
        store(stub, neighbour, "k")
    reply = stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
    assert reply.removed == 3
    assert all(lookup(stub, tenant, "k", model=m).result == pb.CACHE_RESULT_MISS for m in ("m1", "m2", "m3"))
    for neighbour in neighbours:
        assert lookup(stub, neighbour, "k").result == pb.CACHE_RESULT_EXACT_HIT
    # A glob character in the tenant id matches nothing but that tenant.
    assert stub.Invalidate(pb.InvalidateRequest(tenant_id="*"), timeout=RPC_TIMEOUT).removed == 0
    assert lookup(stub, f"{tenant}x", "k").result == pb.CACHE_RESULT_EXACT_HIT


def test_stats_count_hits_misses_and_entries(stub, tenant):
    empty = stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
    assert (empty.hits, empty.misses, empty.entries) == (0, 0, 0)
    store(stub, tenant, "a", model="m1")
    store(stub, tenant, "b", model="m2")
    lookup(stub, tenant, "a", model="m1")
    lookup(stub, tenant, "a", model="m1")
    lookup(stub, tenant, "b", model="m2")
    lookup(stub, tenant, "missing")
    lookup(stub, f"{tenant}-other", "a")
    stats = stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
    assert (stats.hits, stats.misses, stats.entries) == (3, 1, 2)
    # Invalidation removes entries but keeps the tenant's counters.
    stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="m2"), timeout=RPC_TIMEOUT)
    stats = stub.Stats(pb.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
    assert (stats.hits, stats.misses, stats.entries) == (3, 1, 1)


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [
        ("Lookup", pb.LookupRequest(model="m", request_key="k"), "tenant_id"),
        ("Lookup", pb.LookupRequest(tenant_id="t", request_key="k"), "model"),
        ("Lookup", pb.LookupRequest(tenant_id="t", model="m"), "request_key"),
        ("Store", pb.StoreRequest(model="m", request_key="k", response=b"r"), "tenant_id"),
        ("Store", pb.StoreRequest(tenant_id="t", request_key="k", response=b"r"), "model"),
        ("Store", pb.StoreRequest(tenant_id="t", model="m", response=b"r"), "request_key"),
        ("Store", pb.StoreRequest(tenant_id="t", model="m", request_key="k"), "response"),
        (
            "Store",
            pb.StoreRequest(tenant_id="t", model="m", request_key="k", response=b"r", ttl_seconds=-1),
            "ttl_seconds",
        ),
        ("Invalidate", pb.InvalidateRequest(model="m"), "tenant_id"),
        ("Stats", pb.StatsRequest(), "tenant_id"),
    ],
)
def test_invalid_requests_name_the_field(stub, method, request_message, field):
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request_message, timeout=RPC_TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}:")


def test_oversized_entry_is_refused(stub, tenant):
    with pytest.raises(grpc.RpcError) as raised:
        store(stub, tenant, "big", b"x" * (MAX_ENTRY_BYTES + 1))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("response:")
    assert lookup(stub, tenant, "big").result == pb.CACHE_RESULT_MISS
    store(stub, tenant, "at-limit", b"x" * MAX_ENTRY_BYTES)
    assert lookup(stub, tenant, "at-limit").response == b"x" * MAX_ENTRY_BYTES


# --- Redis outages: each test gets its own Redis and cache process ------------------------------------


def _health(mesh: Mesh) -> int | None:
    with internal_blocking_channel(mesh, "cache") as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            )
        except grpc.RpcError:
            return None


def _lookup_error(stub) -> tuple[grpc.StatusCode, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        lookup(stub, "t", "k")
    return raised.value.code(), time.monotonic() - started


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
        mesh.wait_ready(["cache"], timeout=30)
        with internal_blocking_channel(mesh, "cache") as channel:
            assert lookup(cache_pb2_grpc.CacheServiceStub(channel), "t", "k").result == pb.CACHE_RESULT_MISS
    finally:
        mesh.stop_all()


@pytest.fixture
def fresh_mesh(tmp_path):
    mesh = _start(tmp_path)
    yield mesh
    mesh.stop_all()


def test_unavailable_while_redis_is_stopped_then_recovers(fresh_mesh):
    with internal_blocking_channel(fresh_mesh, "cache") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        store(stub, "t", "k", b"kept")
        time.sleep(1.2)  # appendfsync everysec: let the entry reach the append-only file
        fresh_mesh.stop("redis")
        code, elapsed = _lookup_error(stub)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 3
        fresh_mesh.start("redis")
        fresh_mesh.wait_ready(["redis"], timeout=30)
        assert lookup(stub, "t", "k").response == b"kept"


def test_unavailable_not_a_hang_when_redis_freezes(fresh_mesh):
    redis_pid = fresh_mesh.processes["redis"].pid
    with internal_blocking_channel(fresh_mesh, "cache") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        assert lookup(stub, "t", "k").result == pb.CACHE_RESULT_MISS
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            code, elapsed = _lookup_error(stub)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert elapsed < RPC_TIMEOUT / 2
        assert lookup(stub, "t", "k").result == pb.CACHE_RESULT_MISS
