"""A whole mesh (Redis, the five services, Envoy) on free loopback ports, shared by the edge tests."""

from __future__ import annotations

import pytest

from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tests.support import free_port_block, mesh_environ
from tools.mesh import COMPONENTS, SERVICES, Mesh

DEV_KEY = "sk-test-dev-key-0001"
ADMIN_KEY = "sk-test-admin-key-0001"


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    environ = mesh_environ({"SOPHIA_DEV_KEY": DEV_KEY, "SOPHIA_ADMIN_KEY": ADMIN_KEY})
    environ["SOPHIA__GATEWAY__OUTBOX_DIR"] = str(tmp_path_factory.mktemp("outbox"))
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = str(free_port_block(len(PROMETHEUS_PORT_OFFSETS)))
    running = Mesh(tmp_path_factory.mktemp("mesh"), environ)
    try:
        for component in COMPONENTS:
            running.start(component)
            if component == "redis":
                running.wait_ready(["redis"], 30)
            if component == "envoy":
                running.wait_ready(SERVICES, 300)
                running.wait_ready(["envoy"], 60)
        yield running
    finally:
        running.stop_all()


def metrics_url(mesh: Mesh, component: str) -> str:
    port = mesh.config.telemetry.prometheus_base_port + PROMETHEUS_PORT_OFFSETS[component]
    return f"http://127.0.0.1:{port}/metrics"
