"""A task_type the cost ledger could not bill, or one that cannot travel in a header, is a 400 at the
edge naming the field: before, one over 64 characters was answered and never billed, one over 128 was
planned locally past the tenant's flags and budget, and a non-ASCII one failed the call after billing."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import DEV_KEY


@pytest.fixture(scope="module")
def http(mesh):
    with httpx.Client(
        base_url=mesh.edge_url, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=120
    ) as session:
        yield session


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    "task_type", ["x" * 100, "x" * 200, "poésie", "a\nb"], ids=["100", "200", "non-ascii", "newline"]
)
def test_a_task_type_the_ledger_could_not_bill_is_a_400_naming_it(http, task_type, stream):
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4,
        "cache": False,
        "stream": stream,
        "task_type": task_type,
    }
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text[:500]
    error = reply.json()["error"]
    assert error["param"] == "task_type", error
    assert "at most 64 characters" in error["message"]
