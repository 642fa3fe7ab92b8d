"""The generated TypeScript client (clients/ts) against the test mesh's Gateway: its own Node test suite
(clients/ts/test/gateway.test.js) — unary chat, a stream, embeddings, metadata, a deadline, error statuses."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from libs.config import REPO_ROOT
from tests.integration.conftest import DEV_KEY

CLIENT = REPO_ROOT / "clients" / "ts"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (CLIENT / "node_modules" / "@connectrpc").exists(),
    reason="Node.js or clients/ts/node_modules is missing (make install)",
)


def test_typescript_client_suite_passes_against_the_gateway(mesh):
    ran = subprocess.run(
        ["node", "--test", "--test-reporter=tap", "test/"],
        cwd=CLIENT,
        env={**os.environ, "SOPHIA_GATEWAY_ADDRESS": mesh.address("gateway"), "SOPHIA_API_KEY": DEV_KEY},
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = ran.stdout + ran.stderr
    assert ran.returncode == 0, report
    # Every case ran (a suite that silently found no tests would pass too).
    assert "# pass 7" in report and "# fail 0" in report, report
