"""Who may call, and how much: API-key authentication and per-key limits, in front of every RPC.

Availability over strictness when Redis is down:
- keys from the config file keep working (they are checked in memory); keys created through the admin
  API cannot be checked and get UNAVAILABLE "key store unavailable";
- rate limits are not enforced (fail open): an outage of the counter store should not take the whole API
  down with it.
While Redis is known to be down (its breaker is open, see `redis_breaker`) it is not asked at all, so
requests pay no timeouts, and the outage is logged once, its end once.

Revocation: a replica remembers keys it found in Redis for `gateway.key_cache_seconds`. The replica
that revokes a key forgets it at once; every other replica stops accepting it within that time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from redis.asyncio import Redis

from libs.breaker import DependencyBreaker
from libs.errors import FailedPrecondition, NotFound, ResourceExhausted, Unauthenticated, Unavailable
from libs.redis_store import redis_ping_probe
from services.gateway.access.api_keys import CONFIG_KEY_PREFIX, ApiKey, KeyRing, bearer_token, key_digest
from services.gateway.access.key_store import SECRET_PREFIX, KeyStore, RecentKeys
from services.gateway.access.rate_limits import RateLimiter
from services.gateway.domain import Principal

log = logging.getLogger(__name__)

MAX_REMEMBERED_KEYS = 10_000
REDIS_FAILURES_TO_OPEN = 3
_Result = TypeVar("_Result")


def redis_breaker(client: Redis) -> DependencyBreaker:
    """The breaker for the Redis behind keys and limits; its WARNING says what the outage means."""
    return DependencyBreaker(
        "redis (rate limits not enforced, stored API keys unavailable)",
        redis_ping_probe(client),
        # An open breaker lets every request past the limits: one slow command must not do that.
        failure_threshold=REDIS_FAILURES_TO_OPEN,
    )


class AccessControl:
    def __init__(
        self,
        keys: KeyRing,
        store: KeyStore,
        limiter: RateLimiter,
        *,
        key_cache_seconds: float,
        breaker: DependencyBreaker,
    ) -> None:
        self._keys = keys
        self._store = store
        self._limiter = limiter
        self._recent = RecentKeys(key_cache_seconds, MAX_REMEMBERED_KEYS)
        self._breaker = breaker

    async def _redis(self, what: str, command: Callable[[], Awaitable[_Result]]) -> _Result:
        """Runs a Redis-backed `command`; Unavailable at once while Redis is known to be down."""
        if not self._breaker.allows():
            raise Unavailable(f"{what} unavailable")
        try:
            result = await command()
        except Unavailable as exc:
            self._breaker.record_failure(f"{exc.message}: {exc.__cause__}")
            raise
        self._breaker.record_success()
        return result

    # --- callers -------------------------------------------------------------------------------------

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        token = bearer_token(metadata)
        if not token:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = key_digest(token)
        principal = self._keys.find(digest) or self._recent.get(digest)
        if principal is not None:
            return principal
        # Every stored key has this prefix: anything else is refused without asking Redis.
        if not token.startswith(SECRET_PREFIX):
            raise Unauthenticated("invalid API key")
        key = await self._redis("key store", lambda: self._store.find(digest))
        if key is None or key.revoked:
            raise Unauthenticated("invalid API key")
        self._recent.put(digest, key.principal)
        return key.principal

    async def authenticate_admin(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self._keys.authenticate_admin(bearer_token(metadata))

    async def admit(self, principal: Principal, estimated_tokens: int) -> None:
        """Counts one request against the key's limits; raises ResourceExhausted when over them."""
        rpm, tpm = principal.requests_per_minute, principal.tokens_per_minute
        if not rpm and not tpm:
            return
        try:
            refusal = await self._redis(
                "rate limits", lambda: self._limiter.admit(principal.key_id, rpm, tpm, estimated_tokens)
            )
        except Unavailable:
            return  # fail open; the breaker logged the outage
        if refusal is not None:
            raise ResourceExhausted(
                f"rate limit exceeded: {refusal.limit} {refusal.unit} per minute for key {principal.key_id}",
                trailers=(("retry-after", str(refusal.retry_after_seconds)),),
            )

    async def charge(self, principal: Principal, tokens: int) -> None:
        """Adds the tokens a finished request really used to the key's tokens-per-minute window."""
        if not principal.tokens_per_minute or tokens <= 0:
            return
        try:
            await self._redis("rate limits", lambda: self._limiter.charge(principal.key_id, tokens))
        except Unavailable:
            log.debug("tokens not charged to %s: Redis unavailable", principal.key_id)

    async def close(self) -> None:
        await self._breaker.aclose()

    # --- the admin API -------------------------------------------------------------------------------

    async def create_key(
        self, tenant_id: str, name: str, requests_per_minute: int, tokens_per_minute: int
    ) -> tuple[ApiKey, str]:
        key, secret = await self._redis(
            "key store", lambda: self._store.create(tenant_id, name, requests_per_minute, tokens_per_minute)
        )
        log.info("created API key %s for tenant %s", key.key_id, key.tenant_id)
        return key, secret

    async def list_keys(self, tenant_id: str = "") -> list[ApiKey]:
        """Config keys first (read-only), then stored keys, oldest first."""
        configured = [key for key in self._keys.keys() if not tenant_id or key.tenant_id == tenant_id]
        return configured + await self._redis("key store", lambda: self._store.list_keys(tenant_id))

    async def revoke_key(self, key_id: str) -> ApiKey:
        if key_id.startswith(CONFIG_KEY_PREFIX) and self._keys.owns(key_id):
            raise FailedPrecondition(f"key {key_id} comes from the config file and cannot be revoked here")
        key = await self._redis("key store", lambda: self._store.revoke(key_id))
        if key is None:
            raise NotFound(f"no API key with id {key_id!r}")
        self._recent.forget(key_id)
        log.info("revoked API key %s of tenant %s", key.key_id, key.tenant_id)
        return key
