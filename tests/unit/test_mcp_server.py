"""The MCP server's own logic, through the SDK's in-process client: which tools a key sees, what each tool
sends the Gateway (with the caller's key), how refusals come back, and how keys are checked.

The Gateway is a recording stand-in here (tests/integration/test_mcp.py runs the real one).
"""

from __future__ import annotations

import pytest
from mcp import Client
from sophia.gateway.v1 import admin_pb2, gateway_pb2, insight_pb2

from services.mcp.access import GatewayKeyVerifier, TransportRefusal
from services.mcp.gateway import Answer, Caller, GatewayError, Role
from services.mcp.server import build_server
from services.mcp.tools import ADMIN_TOOLS, TENANT_TOOLS

TENANT = Caller(Role.TENANT, "acme", "key_1")
ADMIN = Caller(Role.ADMIN, "", "admin")


class _Methods:
    """Stub attributes name the RPC they stand for, e.g. gateway.CreateChatCompletion → that string."""

    def __getattr__(self, name: str) -> str:
        return name


class RecordingGateway:
    def __init__(self, replies=None, error: GatewayError | None = None, caller: Caller = TENANT) -> None:
        self.calls: list[tuple[str, object, str]] = []
        self.replies = replies or {}
        self.error = error
        self.caller_asks = 0
        self._caller = caller
        self.gateway = self.insight = self.admin = _Methods()

    async def call(self, method: str, request, api_key: str) -> Answer:
        self.calls.append((method, request, api_key))
        if self.error is not None:
            raise self.error
        return self.replies.get(method, Answer(_empty(method), {}))

    async def caller(self, api_key: str) -> Caller:
        self.caller_asks += 1
        if self.error is not None:
            raise self.error
        return self._caller


def _empty(method: str):
    replies = {
        "ListModels": gateway_pb2.ListModelsResponse(),
        "GetTenantUsage": insight_pb2.GetTenantUsageResponse(tenant_id="acme"),
        "GetUsage": admin_pb2.GetUsageResponse(tenant_id="globex"),
        "SetBudget": admin_pb2.SetBudgetResponse(tenant_id="globex", monthly_limit_usd=5),
    }
    return replies.get(method, insight_pb2.GetCacheStatsResponse())


def client_for(gateway: RecordingGateway, caller: Caller = TENANT, key: str = "sk-secret") -> Client:
    async def source():
        return key, caller

    return Client(build_server(gateway, source, "all-minilm-l6-v2"))


def error_text(result) -> str:
    assert result.is_error
    return result.content[0].text


@pytest.mark.parametrize(("caller", "tools"), [(TENANT, TENANT_TOOLS), (ADMIN, ADMIN_TOOLS)])
async def test_each_key_lists_its_roles_tools_only(caller, tools) -> None:
    async with client_for(RecordingGateway(), caller) as client:
        listed = (await client.list_tools()).tools
    assert sorted(tool.name for tool in listed) == sorted(tools)
    assert all(tool.description for tool in listed)


async def test_a_tool_outside_the_role_is_refused_as_unknown_without_calling_the_gateway() -> None:
    gateway = RecordingGateway()
    async with client_for(gateway, TENANT) as client:
        refused = await client.call_tool("set_budget", {"tenant_id": "acme", "monthly_limit_usd": 1})
    async with client_for(gateway, ADMIN) as client:
        refused_chat = await client.call_tool("chat", {"prompt": "hi"})
    assert error_text(refused) == "Unknown tool: set_budget"
    assert error_text(refused_chat) == "Unknown tool: chat"
    assert gateway.calls == []


async def test_chat_sends_one_gateway_call_with_the_callers_key_and_reports_the_answers_headers() -> None:
    reply = gateway_pb2.CreateChatCompletionResponse(
        model="m",
        choices=[
            gateway_pb2.Choice(message=gateway_pb2.AssistantMessage(content="Paris"), finish_reason="stop")
        ],
        usage=gateway_pb2.Usage(prompt_tokens=7, completion_tokens=1),
    )
    headers = {
        "x-sophia-model": "gpt-4o-mini",
        "x-sophia-provider": "openai",
        "x-sophia-cache": "miss",
        "x-sophia-cost-usd": "0.000123",
        "x-sophia-attempts": "2",
        "x-request-id": "r-1",
    }
    gateway = RecordingGateway({"CreateChatCompletion": Answer(reply, headers)})
    async with client_for(gateway) as client:
        result = await client.call_tool(
            "chat", {"prompt": "Capital of France?", "max_tokens": 5, "task_type": "qa"}
        )
    assert result.structured_content == {
        "text": "Paris",
        "finish_reason": "stop",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "cache": "miss",
        "cost_usd": 0.000123,
        "attempts": 2,
        "prompt_tokens": 7,
        "completion_tokens": 1,
        "request_id": "r-1",
    }
    ((method, request, key),) = gateway.calls
    assert (method, key) == ("CreateChatCompletion", "sk-secret")
    assert (request.params.model, request.params.max_tokens, request.params.task_type) == ("auto", 5, "qa")
    assert [(m.role, m.text) for m in request.params.messages] == [("user", "Capital of France?")]


async def test_gateway_refusals_come_back_as_tool_errors_with_the_gateways_message() -> None:
    gateway = RecordingGateway(
        error=GatewayError("INVALID_ARGUMENT", "max_tokens: must be at least 1, got -5")
    )
    async with client_for(gateway) as client:
        result = await client.call_tool("chat", {"prompt": "hi", "max_tokens": -5})
        both = await client.call_tool(
            "chat", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}
        )
    assert error_text(result) == (
        "Error executing tool chat: INVALID_ARGUMENT: max_tokens: must be at least 1, got -5"
    )
    assert error_text(both).endswith("give either prompt or messages (not both, not neither)")
    assert len(gateway.calls) == 1  # the second was refused before any call


async def test_reports_are_the_tenants_own_for_a_tenant_key_and_the_named_tenants_for_the_admin() -> None:
    gateway = RecordingGateway()
    async with client_for(gateway, TENANT) as client:
        own = await client.call_tool("usage_report", {"group_by": "day", "start": "2025-03-01T00:00:00Z"})
        other = await client.call_tool("usage_report", {"tenant_id": "globex"})
    async with client_for(gateway, ADMIN) as client:
        named = await client.call_tool("usage_report", {"tenant_id": "globex", "end": "2025-04-01T00:00:00Z"})
        unnamed = await client.call_tool("usage_report", {})
    assert own.structured_content == {"tenant_id": "acme"}
    assert error_text(other).endswith("tenant_id: a tenant's key reports on its own tenant only")
    assert named.structured_content == {"tenant_id": "globex"}
    assert error_text(unnamed).endswith("tenant_id: required with an admin key")
    (tenant_call, _, _), (admin_call, admin_request, _) = gateway.calls
    assert tenant_call == "GetTenantUsage" and admin_call == "GetUsage"
    assert gateway.calls[0][1].start_time.ToJsonString() == "2025-03-01T00:00:00Z"
    assert (admin_request.tenant_id, admin_request.end_time) == ("globex", "2025-04-01T00:00:00+00:00")


async def test_the_verifier_maps_the_gateways_answer_to_the_transports_status_and_remembers_good_keys() -> (
    None
):
    clock = [0.0]
    gateway = RecordingGateway(caller=TENANT)
    good = GatewayKeyVerifier(gateway, clock=lambda: clock[0])
    token = await good.verify_token("sk-good")
    assert (token.client_id, token.scopes) == ("key_1", ["tenant"])
    await good.verify_token("sk-good")
    assert gateway.caller_asks == 1  # remembered
    clock[0] = 6.0
    await good.verify_token("sk-good")
    assert gateway.caller_asks == 2  # asked again after KEY_CACHE_SECONDS

    assert (
        await GatewayKeyVerifier(RecordingGateway(error=GatewayError("UNAUTHENTICATED", "x"))).verify_token(
            "k"
        )
        is None
    )
    for code, status in (("RESOURCE_EXHAUSTED", 429), ("UNAVAILABLE", 503), ("DEADLINE_EXCEEDED", 503)):
        with pytest.raises(TransportRefusal) as refused:
            await GatewayKeyVerifier(RecordingGateway(error=GatewayError(code, "x"))).verify_token("k")
        assert refused.value.status == status


def test_admin_roles_see_the_tools_their_role_may_use():
    from services.mcp.tools import TOOLS_BY_ROLE

    assert {"invalidate_cache", "set_budget"} <= TOOLS_BY_ROLE[Role.OPERATOR]
    assert TOOLS_BY_ROLE[Role.VIEWER] == {"usage_report", "cost_recommendations", "provider_health"}
    assert not TOOLS_BY_ROLE[Role.VIEWER] & {"chat", "embed", "invalidate_cache", "set_budget"}
