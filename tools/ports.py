"""Free loopback ports, and an environment that moves a whole mesh onto them.

Tests and the benchmark run their own meshes beside (never against) the one `make up` started.
"""

from __future__ import annotations

import os
import socket

from tools.mesh import SERVICES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports (each service serves Prometheus on base + its offset)."""
    for _ in range(100):
        first = free_port()
        if first + size <= 65535 and all(_is_free(first + i) for i in range(size)):
            return first
    raise RuntimeError(f"found no {size} consecutive free ports")


def isolated_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment with every mesh port (services, edge, Redis) moved to a free one."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA")}
    for service in SERVICES:
        environ[f"SOPHIA__SERVICES__{service.upper()}__PORT"] = str(free_port())
    environ["SOPHIA__EDGE__PORT"] = str(free_port())
    environ["SOPHIA__EDGE__ADMIN_PORT"] = str(free_port())
    environ["SOPHIA__MCP__PORT"] = str(free_port())
    environ["SOPHIA_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = "0"
    environ.update(extra or {})
    return environ
