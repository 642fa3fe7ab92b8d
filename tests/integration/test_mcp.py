"""The MCP server against the whole mesh: the official SDK's client over streamable HTTP through the edge
(/mcp) and over stdio (`python -m services.mcp --stdio` as a subprocess)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from contextlib import asynccontextmanager

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from libs.config import REPO_ROOT
from services.mcp.tools import ADMIN_TOOLS, TENANT_TOOLS
from tests.integration.conftest import ADMIN_KEY, DEV_KEY

pytestmark = pytest.mark.integration

# One call per tool, with arguments a tenant's key may use (chat is kept short: the local model on CPU).
TENANT_CALLS = {
    "chat": {"prompt": "Say hello.", "max_tokens": 4},
    "embed": {"texts": ["hello", "world"]},
    "list_models": {},
    "explain_route": {"prompt": "Write a haiku about the sea.", "model_preference": "fast"},
    "usage_report": {"group_by": "model"},
    "cost_recommendations": {},
    "provider_health": {},
    "cache_stats": {},
}


@pytest.fixture(scope="module")
def mcp_url(mesh) -> str:
    mesh.wait_ready(["mcp"], 60)
    return f"{mesh.edge_url}/mcp"


@pytest.fixture(scope="module")
def tenant_keys(mesh) -> dict[str, str]:
    """Two tenants of their own, with keys made through the admin API."""
    keys = {}
    for tenant in (f"acme-{uuid.uuid4().hex[:6]}", f"globex-{uuid.uuid4().hex[:6]}"):
        reply = httpx.post(
            f"{mesh.edge_url}/admin/v1/keys",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            json={"tenant_id": tenant, "name": "mcp-test"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        keys[tenant] = reply.json()["secret"]
    return keys


@asynccontextmanager
async def over_http(url: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    # As docs/mcp.md shows it: the SDK's own HTTP client with the key as a header.
    async with httpx2.AsyncClient(headers=headers, timeout=300) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            yield client


def over_stdio(mesh, key: str) -> Client:
    environ = {**mesh.environ, "SOPHIA_API_KEY": key}
    return Client(
        StdioServerParameters(
            command=sys.executable, args=["-m", "services.mcp", "--stdio"], env=environ, cwd=REPO_ROOT
        )
    )


def result_json(result) -> dict:
    assert not result.is_error, result.content[0].text
    assert result.structured_content is not None
    # The text content carries the same JSON, for clients that read only text.
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def error_text(result) -> str:
    """A tool error's message; the SDK says which tool failed ("Error executing tool chat: ...")."""
    assert result.is_error, result.structured_content
    return re.sub(r"^Error executing tool \w+: ", "", result.content[0].text)


async def check_every_tenant_tool(client: Client) -> None:
    tools = (await client.list_tools()).tools
    assert sorted(tool.name for tool in tools) == sorted(TENANT_TOOLS)
    for tool in tools:
        assert tool.description and "\n" not in tool.description.strip()
        assert tool.input_schema["type"] == "object"
    answers = {
        name: result_json(await client.call_tool(name, arguments)) for name, arguments in TENANT_CALLS.items()
    }

    chat = answers["chat"]
    assert chat["text"] and chat["model"] == "smollm2-135m-instruct" and chat["provider"] == "local"
    assert chat["cache"] in ("hit", "miss", "bypass") and chat["cost_usd"] == 0.0 and chat["request_id"]
    assert [len(vector) for vector in answers["embed"]["vectors"]] == [384, 384]
    assert answers["list_models"]["models"][0]["id"] == "auto"
    route = answers["explain_route"]
    assert route["targets"][0]["model_id"] == "smollm2-135m-instruct" and route["reason"]
    assert route["estimated_prompt_tokens"] > 0
    assert answers["usage_report"]["total"]["requests"] >= 1
    assert "projection" in answers["cost_recommendations"]
    assert {"hits", "misses", "entries"} <= answers["cache_stats"].keys()


async def test_every_tenant_tool_over_streamable_http_through_the_edge(mcp_url) -> None:
    async with over_http(mcp_url, DEV_KEY) as client:
        await check_every_tenant_tool(client)


async def test_every_tenant_tool_over_stdio(mesh) -> None:
    async with over_stdio(mesh, DEV_KEY) as client:
        await check_every_tenant_tool(client)


async def check_every_admin_tool(client: Client, tenant: str) -> None:
    assert sorted(tool.name for tool in (await client.list_tools()).tools) == sorted(ADMIN_TOOLS)
    budget = result_json(
        await client.call_tool("set_budget", {"tenant_id": tenant, "monthly_limit_usd": 12.5})
    )
    assert budget == {"tenant_id": tenant, "monthly_limit_usd": 12.5}
    removed = result_json(await client.call_tool("invalidate_cache", {"tenant_id": tenant}))
    assert removed["tenant_id"] == tenant and removed["removed"] >= 0
    usage = result_json(await client.call_tool("usage_report", {"tenant_id": tenant, "group_by": "day"}))
    assert usage["tenant_id"] == tenant
    advice = result_json(await client.call_tool("cost_recommendations", {"tenant_id": tenant}))
    assert advice["tenant_id"] == tenant and advice["projection"]["limit_usd"] == 12.5
    result_json(await client.call_tool("provider_health", {}))
    # The admin key names a tenant; without one the tool says so.
    assert error_text(await client.call_tool("usage_report", {})) == "tenant_id: required with an admin key"


async def test_every_admin_tool_over_streamable_http_and_stdio(mesh, mcp_url, tenant_keys) -> None:
    tenant = next(iter(tenant_keys))
    async with over_http(mcp_url, ADMIN_KEY) as client:
        await check_every_admin_tool(client, tenant)
    async with over_stdio(mesh, ADMIN_KEY) as client:
        await check_every_admin_tool(client, tenant)


async def test_admin_tools_are_absent_for_a_tenant_key_and_refused_as_unknown(mcp_url) -> None:
    async with over_http(mcp_url, DEV_KEY) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert not names & {"set_budget", "invalidate_cache"}
        refused = await client.call_tool("set_budget", {"tenant_id": "dev", "monthly_limit_usd": 0})
        assert error_text(refused) == "Unknown tool: set_budget"
        assert error_text(await client.call_tool("no_such_tool", {})) == "Unknown tool: no_such_tool"


@pytest.mark.parametrize("key", [None, "sk-sophia-not-a-real-key", ADMIN_KEY + "x"])
async def test_a_missing_or_bad_key_is_refused_by_the_transport_before_any_tool_runs(
    mesh, mcp_url, key
) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "chat", "arguments": {"prompt": "x"}},
    }
    before = mesh.log_path("gateway").read_text().count("CreateChatCompletion")
    async with httpx.AsyncClient(timeout=30) as http:
        reply = await http.post(
            mcp_url, json=call, headers={**headers, "Accept": "application/json, text/event-stream"}
        )
    assert reply.status_code == 401, reply.text
    if key is None:  # refused by the edge itself: a body without credentials is never read
        assert reply.json()["error"]["code"] == "UNAUTHENTICATED"
    else:  # refused by the MCP server, once the Gateway said the key is not valid
        assert reply.json() == {"error": "invalid_token", "error_description": "invalid API key"}
        assert reply.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert mesh.log_path("gateway").read_text().count("CreateChatCompletion") == before
    # The SDK's client cannot even start a session.
    with pytest.raises(BaseExceptionGroup) as refused:
        async with over_http(mcp_url, key):
            pass
    assert refused.group_contains(MCPError)


async def test_stdio_with_a_bad_key_answers_with_a_clear_error(mesh) -> None:
    async with over_stdio(mesh, "sk-sophia-not-a-real-key") as client:
        with pytest.raises(MCPError) as refused:
            await client.list_tools()
    assert "the gateway refused SOPHIA_API_KEY: UNAUTHENTICATED: invalid API key" in str(refused.value)


async def test_a_tenant_sees_only_its_own_usage(mcp_url, tenant_keys) -> None:
    (acme, acme_key), (globex, globex_key) = tenant_keys.items()
    async with over_http(mcp_url, acme_key) as client:
        result_json(await client.call_tool("embed", {"texts": ["only acme pays for this"]}))
        # The record reaches the ledger a few tens of ms after the answer (usage goes in batches).
        for _ in range(100):
            acme_usage = result_json(await client.call_tool("usage_report", {}))
            if acme_usage["total"].get("requests"):
                break
            await asyncio.sleep(0.05)
        refused = await client.call_tool("usage_report", {"tenant_id": globex})
    async with over_http(mcp_url, globex_key) as client:
        globex_usage = result_json(await client.call_tool("usage_report", {}))
        globex_advice = result_json(await client.call_tool("cost_recommendations", {}))

    assert (acme_usage["tenant_id"], acme_usage["total"]["requests"]) == (acme, 1)
    assert acme_usage["rows"][0]["key"] == "all-minilm-l6-v2"
    assert (globex_usage["tenant_id"], globex_usage["total"].get("requests")) == (globex, 0)
    assert globex_advice["tenant_id"] == globex and "recommendations" not in globex_advice
    assert error_text(refused) == "tenant_id: a tenant's key reports on its own tenant only"


async def test_tool_errors_come_back_as_mcp_errors_naming_the_problem(mcp_url) -> None:
    async with over_http(mcp_url, DEV_KEY) as client:
        bad_tokens = await client.call_tool("chat", {"prompt": "hi", "max_tokens": -5})
        assert error_text(bad_tokens).startswith("INVALID_ARGUMENT: max_tokens: must be at least 1")
        unknown_model = await client.call_tool("chat", {"prompt": "hi", "model": "no-such-model"})
        assert error_text(unknown_model).startswith("NOT_FOUND: model: 'no-such-model' does not exist")
        both = await client.call_tool(
            "explain_route", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}
        )
        assert error_text(both) == "give either prompt or messages (not both, not neither)"
        wrong_type = await client.call_tool("embed", {"texts": "not a list"})
        assert "texts" in error_text(wrong_type)
        bad_group = await client.call_tool("usage_report", {"group_by": "week"})
        assert "group_by" in error_text(bad_group)
        # The server is unharmed.
        assert result_json(await client.call_tool("list_models", {}))["models"]


async def test_tool_calls_count_against_the_keys_rate_limit(mesh, mcp_url) -> None:
    tenant = f"limited-{uuid.uuid4().hex[:6]}"
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            f"{mesh.edge_url}/admin/v1/keys",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            json={"tenant_id": tenant, "name": "rpm-2", "requests_per_minute": 2},
        )
    async with over_http(mcp_url, created.json()["secret"]) as client:
        # Listing tools and checking the key are not requests to the gateway's API; each tool call is one.
        for _ in range(2):
            result_json(await client.call_tool("cache_stats", {}))
        over = await client.call_tool("cache_stats", {})
    assert error_text(over).startswith("RESOURCE_EXHAUSTED: rate limit exceeded: 2 requests per minute")
