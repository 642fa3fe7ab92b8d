"""Caller policies, peer identities and the generated mesh certificates, without a server."""

from __future__ import annotations

import importlib
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sophia.cache.v1 import cache_pb2
from sophia.ledger.v1 import ledger_pb2

from libs.tls import CallerPolicy, Identity, ca_path, cert_path, key_path, peer_identity, server_identity
from tools import certs

CACHE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]
LEDGER = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"]


def test_a_policy_admits_only_the_listed_identities():
    policy = CallerPolicy(
        CACHE, {"Store": {Identity.GATEWAY}, "Stats": {Identity.GATEWAY, Identity.OPERATOR}}
    )
    assert policy.allows("/sophia.cache.v1.CacheService/Store", "gateway")
    assert not policy.allows("/sophia.cache.v1.CacheService/Store", "operator")
    assert policy.allows("/sophia.cache.v1.CacheService/Stats", "operator")
    # Not listed: nobody, not even the Gateway.
    assert not policy.allows("/sophia.cache.v1.CacheService/Lookup", "gateway")
    assert not policy.allows("/sophia.cache.v1.CacheService/Store", None)


def test_health_and_reflection_admit_any_identity_but_no_anonymous_caller():
    policy = CallerPolicy(CACHE, {})
    assert policy.allows("/grpc.health.v1.Health/Check", "inference")
    assert policy.allows("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "operator")
    assert not policy.allows("/grpc.health.v1.Health/Check", None)


def test_a_policy_naming_a_method_the_service_lacks_is_refused():
    with pytest.raises(ValueError, match="Stroe"):
        CallerPolicy(CACHE, {"Stroe": {Identity.GATEWAY}})


@pytest.mark.parametrize("service", ["cache", "ledger", "router", "inference"])
def test_every_internal_service_lists_callers_for_each_of_its_methods(service):
    """A method a policy forgets is refused to everyone: caught here rather than in production."""
    policy = importlib.import_module(f"services.{service}.__main__").CALLERS
    assert policy.unlisted() == []


@pytest.mark.parametrize("service", ["cache", "ledger"])
def test_only_the_gateway_writes_cache_entries_and_usage(service):
    policy = importlib.import_module(f"services.{service}.__main__").CALLERS
    method = {
        "cache": "/sophia.cache.v1.CacheService/Store",
        "ledger": "/sophia.ledger.v1.LedgerService/RecordUsage",
    }
    assert [i for i in Identity if policy.allows(method[service], i)] == [Identity.GATEWAY]


def test_the_peer_identity_is_the_verified_common_name():
    assert peer_identity({"x509_common_name": [b"gateway"], "transport_security_type": [b"ssl"]}) == "gateway"
    assert peer_identity({"transport_security_type": [b"insecure"]}) is None
    assert peer_identity({}) is None


def test_the_server_identity_comes_from_the_proto_package():
    assert server_identity("sophia.ledger.v1.LedgerService") is Identity.LEDGER
    with pytest.raises(ValueError):
        server_identity("grpc.health.v1.Health")


def test_generated_certificates_name_their_identity_and_chain_to_the_ca(tmp_path):
    assert certs.ensure(tmp_path)
    ca = x509.load_pem_x509_certificate(ca_path(tmp_path).read_bytes())
    for identity in Identity:
        leaf = x509.load_pem_x509_certificate(cert_path(tmp_path, identity).read_bytes())
        leaf.verify_directly_issued_by(ca)
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [str(identity), "localhost"]
        assert names.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        assert stat.S_IMODE(key_path(tmp_path, identity).stat().st_mode) == 0o600


def test_existing_certificates_are_kept_and_partial_ones_replaced(tmp_path):
    certs.ensure(tmp_path)
    first_ca = ca_path(tmp_path).read_bytes()
    assert not certs.ensure(tmp_path)
    assert ca_path(tmp_path).read_bytes() == first_ca
    key_path(tmp_path, Identity.LEDGER).unlink()
    assert certs.ensure(tmp_path)
    assert ca_path(tmp_path).read_bytes() != first_ca
