"""Idempotency keys: what makes two requests the same, and what a stored claim answers a request."""

from __future__ import annotations

import asyncio
import json

import pytest
from sophia.gateway.v1 import gateway_pb2 as pb

from services.gateway.serving.idempotency import (
    IdempotencyKeys,
    RequestIdReused,
    RequestStillRunning,
    fingerprint,
)


def chat(content: str) -> pb.CreateChatCompletionRequest:
    request = pb.CreateChatCompletionRequest()
    request.params.model = "m"
    request.params.messages.add(role="user").content.string_value = content
    return request


def test_a_fingerprint_binds_the_body_and_the_rpc():
    assert fingerprint("CreateChatCompletion", chat("a")) == fingerprint("CreateChatCompletion", chat("a"))
    assert fingerprint("CreateChatCompletion", chat("a")) != fingerprint("CreateChatCompletion", chat("b"))
    assert fingerprint("CreateChatCompletion", chat("a")) != fingerprint("StreamChatCompletion", chat("a"))


def stored(state: str, fingerprint_value: str = "fp", answer=None) -> str:
    return json.dumps({"fingerprint": fingerprint_value, "state": state, "answer": answer})


def test_a_stored_claim_answers_a_retry_refuses_another_request_and_asks_to_wait():
    done = IdempotencyKeys._existing("key", "id-1", "fp", stored("done", answer={"x": 1}))
    assert done.answer == {"x": 1}
    assert not done.held
    with pytest.raises(RequestIdReused, match="x-request-id"):
        IdempotencyKeys._existing("key", "id-1", "other", stored("done"))
    with pytest.raises(RequestStillRunning) as running:
        IdempotencyKeys._existing("key", "id-1", "fp", stored("running"))
    assert ("retry-after", "1") in running.value.trailers


async def test_a_running_claim_is_renewed_while_its_gateway_lives_and_lapses_when_it_dies(redis_client):
    first, second = IdempotencyKeys(redis_client, 60, lease_seconds=1), IdempotencyKeys(redis_client, 60)
    claim = await first.claim("t", "id-1", "fp")
    assert claim.held
    await asyncio.sleep(2.5)  # more than twice the lease: only the renewal keeps the claim
    with pytest.raises(RequestStillRunning):
        await second.claim("t", "id-1", "fp")
    await first.close()  # the first Gateway dies without settling its claim
    await asyncio.sleep(1.5)
    retried = await second.claim("t", "id-1", "fp")
    assert retried.held, "a dead Gateway's claim must lapse so that a retry can run"
    await second.close()
