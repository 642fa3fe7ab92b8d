"""Internal services take only mutually authenticated callers, each method only from its listed identities.

A mesh of Redis, the cache, the ledger, the router and the Gateway with certificates generated into its
state folder; the callers below present (or fail to present) the certificates of various identities.
"""

from __future__ import annotations

import subprocess
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sophia.cache.v1 import cache_pb2, cache_pb2_grpc
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from sophia.router.v1 import router_pb2, router_pb2_grpc

from libs.tls import Identity, MeshCredentials, ca_path, cert_path, key_path, server_name_options
from tests.support import internal_channel, mesh_environ
from tools import certs
from tools.mesh import VENV_BIN, Mesh

pytestmark = pytest.mark.integration

DEV_KEY = "sk-test-mtls-dev-0001"
RPC_TIMEOUT = 10
INTERNAL = ("cache", "ledger", "router")
NOT_GATEWAY = ("operator", "router", "cache", "ledger", "inference")
# The forged record of issue 13: one request of 2³¹−1 tokens, enough to lock a tenant out.
HUGE = 2**31 - 1


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    running = Mesh(tmp_path_factory.mktemp("mtls"), mesh_environ({"SOPHIA_DEV_KEY": DEV_KEY}))
    running.environ["SOPHIA__GATEWAY__OUTBOX_DIR"] = str(running.state_dir / "outbox")
    try:
        running.start("redis")
        running.wait_ready(["redis"], 30)
        for component in (*INTERNAL, "gateway"):
            running.start(component)
        running.wait_ready([*INTERNAL, "gateway"], 120)
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:8]}"


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def _store(tenant: str) -> cache_pb2.StoreRequest:
    return cache_pb2.StoreRequest(
        tenant_id=tenant, model="m1", question="capital of France?", response=b'{"forged":1}'
    )


def _lookup(tenant: str) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(tenant_id=tenant, model="m1", question="capital of France?")


def _usage(tenant: str) -> ledger_pb2.RecordUsageRequest:
    return ledger_pb2.RecordUsageRequest(
        request_id=uuid.uuid4().hex,
        tenant_id=tenant,
        model_id="smollm2-135m-instruct",
        provider="local",
        input_tokens=HUGE,
        output_tokens=HUGE,
    )


# --- the handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize("service", INTERNAL)
async def test_a_caller_without_a_client_certificate_is_refused(mesh, service):
    server_only = grpc.ssl_channel_credentials(root_certificates=ca_path(mesh.cert_dir).read_bytes())
    async with grpc.aio.secure_channel(
        mesh.address(service), server_only, options=server_name_options(Identity(service))
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", INTERNAL)
async def test_a_plaintext_caller_is_refused(mesh, service):
    async with grpc.aio.insecure_channel(mesh.address(service)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_gateway_certificate_from_another_ca_is_refused(mesh, tmp_path, tenant):
    certs.generate(tmp_path)
    impostor = MeshCredentials(
        Identity.GATEWAY,
        # It trusts the real CA, so only the server's check of the client certificate stops it.
        ca_path(mesh.cert_dir).read_bytes(),
        cert_path(tmp_path, Identity.GATEWAY).read_bytes(),
        key_path(tmp_path, Identity.GATEWAY).read_bytes(),
    )
    async with grpc.aio.secure_channel(
        mesh.address("cache"), impostor.channel(), options=server_name_options(Identity.CACHE)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cache_pb2_grpc.CacheServiceStub(channel).Store(_store(tenant), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with internal_channel(mesh, "cache") as channel:
        reply = await cache_pb2_grpc.CacheServiceStub(channel).Lookup(_lookup(tenant), timeout=RPC_TIMEOUT)
    assert reply.result == cache_pb2.CACHE_RESULT_MISS


async def test_the_client_refuses_a_server_with_another_identity(mesh):
    """A channel meant for the ledger does not talk to whatever answers at the address (here the cache)."""
    gateway = mesh.credentials(Identity.GATEWAY)
    async with grpc.aio.secure_channel(
        mesh.address("cache"), gateway.channel(), options=server_name_options(Identity.LEDGER)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# --- per-method authorization --------------------------------------------------------------------


@pytest.mark.parametrize("identity", NOT_GATEWAY)
async def test_a_forged_store_is_refused_and_never_served(mesh, tenant, identity):
    async with internal_channel(mesh, "cache", identity) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cache_pb2_grpc.CacheServiceStub(channel).Store(_store(tenant), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"'{identity}'" in refused.value.details()
    assert "/sophia.cache.v1.CacheService/Store" in refused.value.details()
    async with internal_channel(mesh, "cache") as channel:
        reply = await cache_pb2_grpc.CacheServiceStub(channel).Lookup(_lookup(tenant), timeout=RPC_TIMEOUT)
    assert reply.result == cache_pb2.CACHE_RESULT_MISS


async def test_the_gateway_stores_and_finds_entries(mesh, tenant):
    async with internal_channel(mesh, "cache", "gateway") as channel:
        cache = cache_pb2_grpc.CacheServiceStub(channel)
        await cache.Store(_store(tenant), timeout=RPC_TIMEOUT)
        reply = await cache.Lookup(_lookup(tenant), timeout=RPC_TIMEOUT)
    assert reply.result == cache_pb2.CACHE_RESULT_HIT


@pytest.mark.parametrize("identity", NOT_GATEWAY)
async def test_a_forged_record_usage_is_refused_and_charges_nothing(mesh, tenant, identity):
    async with internal_channel(mesh, "ledger", identity) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ledger_pb2_grpc.LedgerServiceStub(channel).RecordUsage(_usage(tenant), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"'{identity}' may not call /sophia.ledger.v1.LedgerService/RecordUsage" in refused.value.details()
    async with internal_channel(mesh, "ledger") as channel:
        report = await ledger_pb2_grpc.LedgerServiceStub(channel).GetUsageReport(
            ledger_pb2.GetUsageReportRequest(tenant_id=tenant), timeout=RPC_TIMEOUT
        )
    assert report.total.requests == 0


async def test_the_gateway_records_usage(mesh, tenant):
    async with internal_channel(mesh, "ledger", "gateway") as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        await ledger.RecordUsage(_usage(tenant), timeout=RPC_TIMEOUT)
        report = await ledger.GetUsageReport(
            ledger_pb2.GetUsageReportRequest(tenant_id=tenant), timeout=RPC_TIMEOUT
        )
    assert report.total.requests == 1


async def test_the_operator_reaches_the_administrative_methods_only(mesh, tenant):
    async with internal_channel(mesh, "cache", "operator") as channel:
        cache = cache_pb2_grpc.CacheServiceStub(channel)
        await cache.Stats(cache_pb2.StatsRequest(tenant_id=tenant), timeout=RPC_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cache.Lookup(_lookup(tenant), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with internal_channel(mesh, "ledger", "operator") as channel:
        await ledger_pb2_grpc.LedgerServiceStub(channel).ListPrices(
            ledger_pb2.ListPricesRequest(), timeout=RPC_TIMEOUT
        )
    async with internal_channel(mesh, "router", "operator") as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        await router.GetProviderHealth(router_pb2.GetProviderHealthRequest(), timeout=RPC_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await router.Route(router_pb2.RouteRequest(model="auto"), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("identity", ["cache", "inference"])
async def test_health_answers_any_mesh_identity(mesh, identity):
    async with internal_channel(mesh, "ledger", identity) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_lists_an_internal_service_with_the_operator_certificate(mesh):
    """The README's command: reflection through mTLS with the operator's certificate."""
    directory = mesh.cert_dir
    listed = subprocess.run(
        [
            str(VENV_BIN / "grpcurl"),
            *("-cacert", str(ca_path(directory))),
            *("-cert", str(cert_path(directory, Identity.OPERATOR))),
            *("-key", str(key_path(directory, Identity.OPERATOR))),
            *("-servername", "ledger"),
            mesh.address("ledger"),
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    assert "sophia.ledger.v1.LedgerService" in listed.stdout.split()


# --- the Gateway's public port -------------------------------------------------------------------


async def test_the_gateway_public_port_stays_plaintext_with_api_keys(mesh):
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply = await gateway.ListModels(
            gateway_pb2.ListModelsRequest(),
            metadata=(("authorization", f"Bearer {DEV_KEY}"),),
            timeout=RPC_TIMEOUT,
        )
        assert reply.data
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.ListModels(gateway_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- plaintext, by explicit setting only ---------------------------------------------------------


async def test_plaintext_only_when_set_explicitly(tmp_path):
    certificates = tmp_path / "certs"
    development = Mesh(
        tmp_path, mesh_environ({"SOPHIA__TLS__MODE": "plaintext", "SOPHIA__TLS__DIR": str(certificates)})
    )
    try:
        development.start("router")
        development.wait_ready(["router"], 60)
        async with grpc.aio.insecure_channel(development.address("router")) as channel:
            reply = await router_pb2_grpc.RouterServiceStub(channel).Route(
                router_pb2.RouteRequest(model="auto"), timeout=RPC_TIMEOUT
            )
    finally:
        development.stop_all()
    assert reply.targets
    # Nothing needed certificates, so none were made.
    assert not certificates.exists()


async def test_the_gateway_public_port_serves_tls_when_set(tmp_path):
    public = Mesh(
        tmp_path, mesh_environ({"SOPHIA_DEV_KEY": DEV_KEY, "SOPHIA__TLS__GATEWAY_PUBLIC_TLS": "true"})
    )
    public.environ["SOPHIA__GATEWAY__OUTBOX_DIR"] = str(tmp_path / "outbox")
    key = (("authorization", f"Bearer {DEV_KEY}"),)
    try:
        public.start("redis")
        public.wait_ready(["redis"], 30)
        public.start("gateway")
        public.wait_ready(["gateway"], 60)
        # API keys authenticate the caller: the client needs the CA, no certificate of its own.
        server_only = grpc.ssl_channel_credentials(root_certificates=ca_path(public.cert_dir).read_bytes())
        async with grpc.aio.secure_channel(
            public.address("gateway"), server_only, options=server_name_options(Identity.GATEWAY)
        ) as channel:
            reply = await gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
                gateway_pb2.ListModelsRequest(), metadata=key, timeout=RPC_TIMEOUT
            )
        async with grpc.aio.insecure_channel(public.address("gateway")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
                    gateway_pb2.ListModelsRequest(), metadata=key, timeout=RPC_TIMEOUT
                )
    finally:
        public.stop_all()
    assert reply.data
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
