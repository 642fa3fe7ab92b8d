"""Idempotency keys: a client's x-request-id names one request of one tenant, never several.

The key is scoped to the tenant and bound to the request's fingerprint (which RPC, and its canonical
body). Claims live in the Gateway's Redis, shared by every replica:

    gateway:idempotency:{<tenant>}:<request id>   string   {"fingerprint", "state", "answer"}

- a first request claims the key (RUNNING, a lease of `RUNNING_LEASE_SECONDS` that its Gateway renews
  while the request runs, so a replica that dies mid-request frees it within the lease) and, once
  answered, stores its answer (DONE) for the idempotency window;
- a retry (same key, same fingerprint) gets the stored answer without calling a provider again, and is
  not counted again; while the first attempt still runs it gets ABORTED (HTTP 409) with retry-after;
- the same key with a different request gets ALREADY_EXISTS (HTTP 409), Stripe's convention;
- a first attempt that fails frees the key, so the retry runs for real.

When Redis cannot be asked, the request is served anyway and its usage recorded under an id of its
own, so a provider call is always counted and never merged into another request's record.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as redis
from google.protobuf.message import Message

from libs.errors import ServiceError, Unavailable
from libs.redis_store import unavailable_when_redis_fails
from services.gateway.usage.recorder import derived_request_id

log = logging.getLogger(__name__)

# A running claim is a lease that its Gateway renews while the request runs: if that Gateway dies, the
# claim lapses within the lease and a retry may run instead of being refused for good.
RUNNING_LEASE_SECONDS = 10
RETRY_AFTER_SECONDS = 1
WARN_EVERY_SECONDS = 10.0

# KEYS: the claim. ARGV: fingerprint, running claim JSON, lease seconds.
# Returns {0} when claimed now, else {1, stored claim JSON}.
_CLAIM_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[3]) then
  return {0}
end
return {1, redis.call('GET', KEYS[1])}
"""
# KEYS: the claim. ARGV: fingerprint, new value ('' deletes), expiry seconds.
# Changes the claim only while it is still this request's running claim.
_SETTLE_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
if not stored then
  return 0
end
local claim = cjson.decode(stored)
if claim['fingerprint'] ~= ARGV[1] or claim['state'] ~= 'running' then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
"""


# KEYS: the claim. ARGV: fingerprint, lease seconds. Extends the lease only of a claim still running.
_RENEW_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
if not stored then
  return 0
end
local claim = cjson.decode(stored)
if claim['fingerprint'] ~= ARGV[1] or claim['state'] ~= 'running' then
  return 0
end
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""


class ClaimState(enum.Enum):
    RUNNING = "running"
    DONE = "done"


class RequestIdReused(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class RequestStillRunning(ServiceError):
    code = grpc.StatusCode.ABORTED


def fingerprint(rpc: str, request: Message) -> str:
    """Which RPC and its canonical body: equal for a retry of the same request, different otherwise."""
    digest = hashlib.sha256(rpc.encode() + b"\n")
    digest.update(request.SerializeToString(deterministic=True))
    return digest.hexdigest()


@dataclass(frozen=True)
class Claim:
    """This request's hold on its key. `record_request_id` is the id its usage is recorded under;
    `answer` is set when the request was answered before and must be replayed."""

    key: str
    fingerprint: str
    record_request_id: str
    held: bool
    answer: dict[str, Any] | None = None


def _key(tenant_id: str, request_id: str) -> str:
    return "gateway:idempotency:{" + tenant_id + "}:" + request_id


class IdempotencyKeys:
    def __init__(
        self, client: redis.Redis, window_seconds: float, lease_seconds: int = RUNNING_LEASE_SECONDS
    ) -> None:
        self._window_seconds = max(1, int(window_seconds))
        self._lease_seconds = lease_seconds
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._settle = client.register_script(_SETTLE_SCRIPT)
        self._renew = client.register_script(_RENEW_SCRIPT)
        self._last_warning = float("-inf")
        # Claims this process holds (key → fingerprint), renewed until they are settled.
        self._held: dict[str, str] = {}
        self._renewing: asyncio.Task | None = None

    async def claim(self, tenant_id: str, request_id: str, request_fingerprint: str | None) -> Claim:
        """Claims the key for this request, or says why it may not run (raises), or hands back the
        stored answer. `request_fingerprint` None: the Gateway made the id up, no claim is needed."""
        key = _key(tenant_id, request_id)
        if request_fingerprint is None:
            return Claim(key, "", request_id, held=False)
        running = json.dumps({"fingerprint": request_fingerprint, "state": ClaimState.RUNNING.value})
        try:
            with unavailable_when_redis_fails("idempotency keys"):
                verdict = await self._claim(
                    keys=[key], args=[request_fingerprint, running, self._lease_seconds]
                )
        except Unavailable as exc:
            self._warn(f"idempotency keys not checked, Redis unavailable: {exc.__cause__}")
            unique = derived_request_id(request_id, uuid.uuid4().hex)
            return Claim(key, request_fingerprint, unique, held=False)
        if verdict[0] == 0:
            self._hold(key, request_fingerprint)
            return Claim(key, request_fingerprint, request_id, held=True)
        return self._existing(key, request_id, request_fingerprint, verdict[1])

    @staticmethod
    def _existing(key: str, request_id: str, request_fingerprint: str, stored_json: str | None) -> Claim:
        stored = json.loads(stored_json or "{}")
        if stored.get("fingerprint") != request_fingerprint:
            raise RequestIdReused(
                f"x-request-id: {request_id!r} was already used for a different request; "
                "send a new x-request-id for a new request"
            )
        if stored.get("state") == ClaimState.DONE.value:
            return Claim(key, request_fingerprint, request_id, held=False, answer=stored.get("answer"))
        raise RequestStillRunning(
            f"x-request-id: the request {request_id!r} is still running; retry once it has finished",
            trailers=(("retry-after", str(RETRY_AFTER_SECONDS)),),
        )

    async def complete(self, claim: Claim, answer: dict[str, Any]) -> None:
        """Keeps the answer for retries, for the idempotency window."""
        if not claim.held:
            return
        done = {
            "fingerprint": claim.fingerprint,
            "state": ClaimState.DONE.value,
            "answer": answer,
            "answered_at": time.time(),
        }
        await self._change(claim, json.dumps(done), "answer not kept")

    async def release(self, claim: Claim) -> None:
        """The request failed: its key is free for a retry."""
        if claim.held:
            await self._change(claim, "", "key not freed (it expires with its lease)")

    def _hold(self, key: str, request_fingerprint: str) -> None:
        self._held[key] = request_fingerprint
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self._lease_seconds / 3)
            for key, held_fingerprint in list(self._held.items()):
                try:
                    with unavailable_when_redis_fails("idempotency keys"):
                        await self._renew(keys=[key], args=[held_fingerprint, self._lease_seconds])
                except Unavailable as exc:
                    self._warn(f"idempotency lease not renewed, Redis unavailable: {exc.__cause__}")

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)

    async def _change(self, claim: Claim, value: str, consequence: str) -> None:
        self._held.pop(claim.key, None)
        try:
            with unavailable_when_redis_fails("idempotency keys"):
                await self._settle(keys=[claim.key], args=[claim.fingerprint, value, self._window_seconds])
        except Unavailable as exc:
            self._warn(f"idempotency key {consequence}, Redis unavailable: {exc.__cause__}")

    def _warn(self, message: str) -> None:
        # One line per interval, not one per request, while Redis is down.
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning(message)
