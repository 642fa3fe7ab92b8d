"""Helpers for tests that run real processes: free ports and per-test mesh environments."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tools.mesh import SERVICES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(size: int) -> int:
    """The first of `size` consecutive ports that are free right now (Prometheus ports go by offset)."""
    for _ in range(100):
        first = free_port()
        if first + size > 65535:
            continue
        try:
            held = []
            for port in range(first, first + size):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports")


def mesh_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment with every port moved to a free one, so tests never meet `make up`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA")}
    for service in SERVICES:
        environ[f"SOPHIA__SERVICES__{service.upper()}__PORT"] = str(free_port())
    environ["SOPHIA__EDGE__PORT"] = str(free_port())
    environ["SOPHIA__EDGE__ADMIN_PORT"] = str(free_port())
    environ["SOPHIA_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = "0"
    # Model weights are converted once and shared by every test run (conversion takes a while).
    environ["SOPHIA__INFERENCE__WEIGHTS_DIR"] = str(Path(__file__).resolve().parent.parent / "var" / "models")
    environ.update(extra or {})
    return environ
