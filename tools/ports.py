"""Free loopback ports, and an environment that moves a whole mesh onto them.

Tests and the benchmark run their own meshes beside (never against) the one `make up` started.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from tools.mesh import SERVICES

# Ports are picked below the kernel's ephemeral range. A port the kernel hands out (bind to 0) comes from
# that range, and so does the local port of every outgoing connection: one opened between picking a port
# and the service binding it took the port and failed the service's start (seen in CI: "Address already
# in use" for a whole test module's mesh). Outgoing connections never use ports below the range.
_LOWEST_PORT = 10000
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port free now, outside the ephemeral range, not handed out before by this process."""
    low, high = _ephemeral_range()
    choices = range(_LOWEST_PORT, low) if low - _LOWEST_PORT >= 1000 else range(high + 1, 65536)
    for _ in range(1000):
        port = random.choice(choices)
        if port not in _handed_out and _is_free(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"found no free port in {choices.start}-{choices.stop - 1}")


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
        block = range(first + 1, first + size)
        if first + size <= 65535 and all(p not in _handed_out and _is_free(p) for p in block):
            _handed_out.update(block)
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
