"""A whole mesh (Redis, the five services, Envoy) on free loopback ports, shared by the edge tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tests.support import free_port_block, mesh_environ
from tools.mesh import COMPONENTS, SERVICES, Mesh

DEV_KEY = "sk-test-dev-key-0001"
ADMIN_KEY = "sk-test-admin-key-0001"


def full_mesh_environ(tmp_path_factory, dev_key: str, admin_key: str) -> dict[str, str]:
    environ = mesh_environ({"SOPHIA_DEV_KEY": dev_key, "SOPHIA_ADMIN_KEY": admin_key})
    environ["SOPHIA__GATEWAY__OUTBOX_DIR"] = str(tmp_path_factory.mktemp("outbox"))
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = str(free_port_block(len(PROMETHEUS_PORT_OFFSETS)))
    return environ


def start_full_mesh(state: Path, environ: dict[str, str]) -> Mesh:
    """Redis, the five services and the edge, in start order; stopped again if any fails to start."""
    running = Mesh(state, environ)
    try:
        for component in COMPONENTS:
            running.start(component)
            if component == "redis":
                running.wait_ready(["redis"], 30)
            if component == "envoy":
                running.wait_ready(SERVICES, 300)
                running.wait_ready(["envoy"], 60)
    except BaseException:
        running.stop_all()
        raise
    return running


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    running = start_full_mesh(
        tmp_path_factory.mktemp("mesh"), full_mesh_environ(tmp_path_factory, DEV_KEY, ADMIN_KEY)
    )
    try:
        yield running
    finally:
        running.stop_all()


def metrics_url(mesh: Mesh, component: str) -> str:
    port = mesh.config.telemetry.prometheus_base_port + PROMETHEUS_PORT_OFFSETS[component]
    return f"http://127.0.0.1:{port}/metrics"
