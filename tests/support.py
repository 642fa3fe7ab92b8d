"""Helpers for tests that run real processes."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import grpc

from libs.config import REPO_ROOT
from libs.tls import Identity, ca_path, cert_path, key_path, mesh_channel
from tools.mesh import Mesh
from tools.ports import free_port, free_port_block, isolated_environ

__all__ = [
    "free_port",
    "free_port_block",
    "grpcurl_security",
    "internal_blocking_channel",
    "internal_channel",
    "mesh_environ",
]


@functools.cache
def _session_cert_dir() -> Path:
    """One mesh CA per test session (the first mesh to start generates it), never `make up`'s."""
    directory = Path(tempfile.mkdtemp(prefix="sophia-test-certs-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def mesh_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every port moved to a free one, so tests never meet `make up`; model weights shared across runs.

    All test meshes share one CA: a test that runs a second Gateway against the first mesh's services
    builds a second Mesh from the same environment, and its certificates must be trusted there.
    """
    return isolated_environ(
        {
            # Converting the GGUF weights takes a while: every test run reuses `make install`'s conversion.
            "SOPHIA__INFERENCE__WEIGHTS_DIR": str(REPO_ROOT / "var" / "models"),
            "SOPHIA__TLS__DIR": str(_session_cert_dir()),
            **(extra or {}),
        }
    )


def internal_channel(mesh: Mesh, service: str, identity: str = "gateway") -> grpc.aio.Channel:
    """An asyncio channel to an internal service of `mesh`, presenting `identity`'s certificate."""
    return mesh_channel(mesh.address(service), mesh.credentials(Identity(identity)), Identity(service))


def internal_blocking_channel(mesh: Mesh, service: str, identity: str = "gateway") -> grpc.Channel:
    """The blocking twin of `internal_channel`, for tests written without asyncio."""
    return mesh.blocking_channel(service, Identity(identity))


def grpcurl_security(mesh: Mesh, service: str, identity: str = "operator") -> list[str]:
    """grpcurl's flags to reach `service` of `mesh` as `identity` (plaintext for the Gateway's port)."""
    credentials = mesh.credentials(Identity(identity))
    if credentials is None or service == "gateway":
        return ["-plaintext"]
    directory = mesh.cert_dir
    return [
        *("-cacert", str(ca_path(directory))),
        *("-cert", str(cert_path(directory, credentials.identity))),
        *("-key", str(key_path(directory, credentials.identity))),
        *("-servername", service),
    ]
