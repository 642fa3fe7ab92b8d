"""Mesh identities and their TLS material: who a process is, and what it presents to its peers.

Every service (and `operator`, for people and tools) holds one certificate signed by the mesh CA whose
common name is its identity (tools/certs.py makes them). Internal services require one from each caller
(mTLS) and admit each method only from the identities their `CallerPolicy` lists (libs/server.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from libs.config import REPO_ROOT, TlsConfig, TlsMode


class Identity(StrEnum):
    GATEWAY = "gateway"
    ROUTER = "router"
    CACHE = "cache"
    LEDGER = "ledger"
    INFERENCE = "inference"
    # People and tools (grpcurl, scripts): the administrative methods only.
    OPERATOR = "operator"


class TlsError(Exception):
    """The TLS material is missing or unreadable; the message names the file."""


# Health checks and reflection answer any caller the handshake authenticated.
_OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def cert_dir(tls: TlsConfig) -> Path:
    return REPO_ROOT / tls.dir


def ca_path(directory: Path) -> Path:
    return directory / "ca.pem"


def cert_path(directory: Path, identity: Identity) -> Path:
    return directory / f"{identity}.pem"


def key_path(directory: Path, identity: Identity) -> Path:
    return directory / f"{identity}-key.pem"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(
            f"cannot read {path}: {exc.strerror} (make up generates the mesh certificates)"
        ) from None


@dataclass(frozen=True)
class MeshCredentials:
    """One identity's certificate and key, with the CA that every peer's certificate must chain to."""

    identity: Identity
    ca: bytes
    certificate: bytes
    key: bytes

    @classmethod
    def load(cls, directory: Path, identity: Identity) -> MeshCredentials:
        return cls(
            identity,
            _read(ca_path(directory)),
            _read(cert_path(directory, identity)),
            _read(key_path(directory, identity)),
        )

    def server(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.certificate)],
            root_certificates=self.ca if require_client_auth else None,
            require_client_auth=require_client_auth,
        )

    def channel(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.certificate
        )


def load_credentials(tls: TlsConfig, identity: Identity) -> MeshCredentials | None:
    """`identity`'s credentials, or None when the mesh runs in plaintext (development)."""
    if tls.mode is TlsMode.PLAINTEXT:
        return None
    return MeshCredentials.load(cert_dir(tls), identity)


def server_name_options(server: Identity) -> list[tuple[str, str]]:
    """Channel options that make the client accept only `server`'s certificate, whatever the address."""
    return [("grpc.ssl_target_name_override", str(server))]


def server_identity(service: str) -> Identity:
    """The identity serving a gRPC service: Sophia's proto packages are `sophia.<identity>.v1`."""
    parts = service.split(".")
    if len(parts) < 3 or parts[0] != "sophia":
        raise ValueError(f"{service!r} is not a Sophia service name")
    return Identity(parts[1])


def mesh_channel(
    address: str,
    credentials: MeshCredentials | None,
    server: Identity,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel that presents `credentials` and accepts only `server`; plaintext when they are None."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        address,
        credentials.channel(),
        options=[*options, *server_name_options(server)],
        interceptors=interceptors,
    )


# One process is one service, so every channel it opens presents that service's certificate; the
# service's entry point adopts it once (libs/server.py) and libs/clients.py reads it here.
_own_credentials: MeshCredentials | None = None
_own_identity_adopted = False


def adopt(credentials: MeshCredentials | None) -> None:
    global _own_credentials, _own_identity_adopted
    _own_credentials, _own_identity_adopted = credentials, True


def adopted() -> MeshCredentials | None:
    """The process's own credentials (None: plaintext development mesh)."""
    if not _own_identity_adopted:
        raise TlsError("no mesh identity adopted: a service adopts its own in run_service before calling out")
    return _own_credentials


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The common name of the certificate the caller presented, if the handshake verified one."""
    names = list(auth_context.get("x509_common_name", ()))
    return names[0].decode(errors="replace") if len(names) == 1 else None


class CallerPolicy:
    """Which identities may call each method of one service; a method it does not list is refused."""

    def __init__(self, service: ServiceDescriptor, callers: Mapping[str, Iterable[Identity]]) -> None:
        unknown = set(callers) - {method.name for method in service.methods}
        if unknown:
            raise ValueError(f"{service.full_name} has no method {', '.join(sorted(unknown))}")
        self._service = service
        self._callers = {
            f"/{service.full_name}/{name}": frozenset(identities) for name, identities in callers.items()
        }

    def allows(self, method: str, identity: str | None) -> bool:
        if identity is None:
            return False
        if method.lstrip("/").split("/", 1)[0] in _OPEN_SERVICES:
            return True
        return identity in self._callers.get(method, frozenset())

    def unlisted(self) -> list[str]:
        """The service's methods nobody may call because the policy does not mention them."""
        service = self._service
        return [m.name for m in service.methods if f"/{service.full_name}/{m.name}" not in self._callers]
