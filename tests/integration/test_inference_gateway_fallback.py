"""A prompt longer than the local model's window, through the real Gateway: ModelInference refuses it
with OUT_OF_RANGE, and the Gateway tries the next model (one with a larger window) instead of giving up;
with no model left the caller gets INVALID_ARGUMENT naming `messages`."""

from __future__ import annotations

import re
import subprocess
import sys

import grpc
import pytest
import yaml
from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from libs.config import DEFAULT_CONFIG_PATH, REPO_ROOT
from tests.support import mesh_environ
from tools.mesh import Mesh

KEY = "sk-window-test-key-01"
PROVIDER_KEY = "sk-fake-window-provider"
LONG_PROMPT = "word " * 9000  # about 9000 tokens: beyond SmolLM2's 8192


@pytest.fixture(scope="module")
def fake_provider(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("fake") / "provider.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.provider", "--port", "0", "--api-key", PROVIDER_KEY],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    found = re.search(r"listening on (http://\S+)", process.stdout.readline().decode())
    try:
        assert found, "the fake provider did not start"
        yield found.group(1)
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, fake_provider):
    state = tmp_path_factory.mktemp("mesh")
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["auth"]["tenants"] = {"dev": {"api_keys": [{"name": "dev", "key": KEY}]}}
    config["providers"]["fake"] = {
        "type": "openai",
        "base_url": f"{fake_provider}/v1",
        "api_key_env": "FAKE_KEY",
    }
    # The configured windows let the long prompt through the routing rules to the local model, whose
    # real window (8192) is smaller: only ModelInference knows, and the Gateway must act on its answer.
    config["models"]["smollm2-135m-instruct"]["context_window"] = 100_000
    config["models"]["smollm2-solo"] = {
        "provider": "local",
        "kind": "chat",
        "provider_model": "smollm2-135m-instruct",
        "context_window": 100_000,
    }
    config["models"]["big-gpt"] = {
        "provider": "fake",
        "kind": "chat",
        "provider_model": "fake-gpt",
        "context_window": 200_000,
    }
    config["routing"]["fallback_map"] = {"smollm2-135m-instruct": ["big-gpt"]}
    path = state / "sophia.yaml"
    path.write_text(yaml.safe_dump(config))
    mesh = Mesh(state, mesh_environ({"SOPHIA_CONFIG": str(path), "FAKE_KEY": PROVIDER_KEY}))
    try:
        for component in ("inference", "gateway"):
            mesh.start(component)
        mesh.wait_ready(["inference", "gateway"], 300)
        yield mesh
    finally:
        mesh.stop_all()


async def chat(mesh: Mesh, model: str, prompt: str):
    request = gateway_pb2.CreateChatCompletionRequest()
    request.params.model = model
    request.params.max_tokens = 8
    message = request.params.messages.add(role="user")
    message.content.string_value = prompt
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).CreateChatCompletion(
            request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=120
        )
        reply = await call
        return reply, dict(await call.initial_metadata())


async def test_a_prompt_too_long_for_the_local_window_falls_back_to_a_larger_model(gateway):
    reply, headers = await chat(gateway, "smollm2-135m-instruct", LONG_PROMPT)
    assert headers["x-sophia-model"] == "big-gpt"
    assert headers["x-sophia-attempts"] == "2"
    assert reply.choices[0].message.content.startswith("word word")


async def test_with_no_larger_model_left_the_caller_hears_which_field_to_change(gateway):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await chat(gateway, "smollm2-solo", LONG_PROMPT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("messages: ") and "8192" in refused.value.details()


async def test_a_prompt_that_fits_is_answered_by_the_local_model(gateway):
    reply, headers = await chat(gateway, "smollm2-135m-instruct", "What is the capital of France?")
    assert (headers["x-sophia-model"], headers["x-sophia-attempts"]) == ("smollm2-135m-instruct", "1")
    assert reply.usage.completion_tokens > 0
