"""Helpers for tests that run real processes."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from redis import exceptions as redis_errors
from redis.asyncio import Redis

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
    "throwaway_redis",
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


@contextlib.asynccontextmanager
async def throwaway_redis(directory: Path, *, decode_responses: bool = True) -> AsyncIterator[Redis]:
    """A redis-server of the test's own on a free loopback port, storing nothing on disk, and a client to
    it once it answers."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    server = await asyncio.create_subprocess_exec(
        *command, "--save", "", "--appendonly", "no", stdout=subprocess.DEVNULL
    )
    client = Redis(port=port, decode_responses=decode_responses)
    try:
        for _ in range(100):
            try:
                await client.ping()
                break
            except redis_errors.ConnectionError:
                await asyncio.sleep(0.05)
        yield client
    finally:
        await client.aclose()
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
