"""The Gateway's Routing against an in-process Router that validates requests as the real one does: its
INVALID_ARGUMENT is the client's error, answered as such, never a reason to plan locally."""

from __future__ import annotations

import grpc
import pytest
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs import tls
from libs.config import REPO_ROOT, load_config
from libs.errors import FailedPrecondition, InvalidArgument
from libs.feature_flags import FeatureFlags
from libs.server import _Observed
from services.gateway.domain import ChatRequest, Message
from services.gateway.serving.router_client import Routing
from services.router.servicer import route_request


class _ValidatingRouter(router_pb2_grpc.RouterServiceServicer):
    """The Router's own request validation, then a one-model plan."""

    async def Route(self, request, context):
        route_request(request)
        target = pb.RouteTarget(model_id="smollm2-135m-instruct", provider="local")
        return pb.RouteResponse(targets=[target], reason="routed by the router", task_type=request.task_type)


@pytest.fixture
async def routing():
    server = grpc.aio.server(interceptors=[_Observed()])  # errors become statuses as in every service
    router_pb2_grpc.add_RouterServiceServicer_to_server(_ValidatingRouter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = load_config(
        REPO_ROOT / "config" / "sophia.yaml", environ={"SOPHIA__SERVICES__ROUTER__PORT": str(port)}
    )
    adopted = tls._own_credentials, tls._own_identity_adopted
    tls.adopt(None)  # a plaintext development mesh: this process presents no certificate
    try:
        routing = Routing(config, FeatureFlags(None))
    finally:
        tls._own_credentials, tls._own_identity_adopted = adopted
    try:
        yield routing
    finally:
        await routing.close()
        await server.stop(0)


def ask(task_type: str) -> ChatRequest:
    return ChatRequest(model="auto", messages=(Message("user", "hi"),), task_type=task_type)


async def test_a_request_the_router_refuses_is_refused_naming_the_field(routing):
    assert (await routing.plan(ask("code"), "acme", "r-1", 10)).reason == "routed by the router"
    with pytest.raises(InvalidArgument) as raised:
        await routing.plan(ask("x" * 129), "acme", "r-2", 10)
    assert raised.value.field == "task_type"
    assert "at most 128 characters" in raised.value.problem


async def test_a_model_flagged_off_for_the_tenant_is_not_planned_while_the_router_is_away(tmp_path):
    """The Router leaves such a model out; planning locally (Router down) must too."""
    path = tmp_path / "flags.yaml"
    path.write_text("models:\n  smollm2-135m-instruct: {rollout_percentage: 0}\n")
    config = load_config(REPO_ROOT / "config" / "sophia.yaml", environ={})
    request = ChatRequest(model="smollm2-135m-instruct", messages=(Message("user", "hi"),))
    adopted = tls._own_credentials, tls._own_identity_adopted
    tls.adopt(None)  # a plaintext development mesh: this process presents no certificate
    try:
        off = Routing(config, FeatureFlags(path))
        path.write_text("models:\n  smollm2-135m-instruct: {rollout_percentage: 100}\n")
        on = Routing(config, FeatureFlags(path))
    finally:
        tls._own_credentials, tls._own_identity_adopted = adopted
    try:
        with pytest.raises(FailedPrecondition, match="enabled for this tenant"):
            off.local_plan(request, "acme", 10)
        planned = on.local_plan(request, "acme", 10).targets
    finally:
        await off.close()
        await on.close()
    assert [t.model_id for t in planned] == ["smollm2-135m-instruct"]
