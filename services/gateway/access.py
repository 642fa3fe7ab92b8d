"""Who may call, and how much: API-key authentication and per-key limits, in front of every RPC.

Availability over strictness when Redis is down:
- keys from the config file keep working (they are checked in memory); keys created through the admin
  API cannot be checked and get UNAVAILABLE "key store unavailable";
- rate limits are not enforced (fail open, with a WARNING at most every `WARN_EVERY_SECONDS`): an outage
  of the counter store should not take the whole API down with it.

Revocation: a replica remembers keys it found in Redis for `gateway.key_cache_seconds`. The replica
that revokes a key forgets it at once; every other replica stops accepting it within that time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from libs.errors import FailedPrecondition, NotFound, ResourceExhausted, Unauthenticated, Unavailable
from services.gateway.auth import CONFIG_KEY_PREFIX, ApiKey, KeyRing, bearer_token, key_digest
from services.gateway.domain import Principal
from services.gateway.keystore import SECRET_PREFIX, KeyStore, RecentKeys
from services.gateway.ratelimit import RateLimiter

log = logging.getLogger(__name__)

MAX_REMEMBERED_KEYS = 10_000
WARN_EVERY_SECONDS = 10.0


class AccessControl:
    def __init__(
        self, keys: KeyRing, store: KeyStore, limiter: RateLimiter, *, key_cache_seconds: float
    ) -> None:
        self._keys = keys
        self._store = store
        self._limiter = limiter
        self._recent = RecentKeys(key_cache_seconds, MAX_REMEMBERED_KEYS)
        self._last_warning = float("-inf")

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
        key = await self._store.find(digest)
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
            refusal = await self._limiter.admit(principal.key_id, rpm, tpm, estimated_tokens)
        except Unavailable as exc:
            self._warn(f"rate limits not enforced, Redis unavailable: {exc.__cause__}")
            return
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
            await self._limiter.charge(principal.key_id, tokens)
        except Unavailable as exc:
            self._warn(f"tokens not charged to {principal.key_id}, Redis unavailable: {exc.__cause__}")

    def _warn(self, message: str) -> None:
        # One line per interval, not one per request, while Redis is down.
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning(message)

    # --- the admin API -------------------------------------------------------------------------------

    async def create_key(
        self, tenant_id: str, name: str, requests_per_minute: int, tokens_per_minute: int
    ) -> tuple[ApiKey, str]:
        key, secret = await self._store.create(tenant_id, name, requests_per_minute, tokens_per_minute)
        log.info("created API key %s for tenant %s", key.key_id, key.tenant_id)
        return key, secret

    async def list_keys(self, tenant_id: str = "") -> list[ApiKey]:
        """Config keys first (read-only), then stored keys, oldest first."""
        configured = [key for key in self._keys.keys() if not tenant_id or key.tenant_id == tenant_id]
        return configured + await self._store.list_keys(tenant_id)

    async def revoke_key(self, key_id: str) -> ApiKey:
        if key_id.startswith(CONFIG_KEY_PREFIX) and self._keys.owns(key_id):
            raise FailedPrecondition(f"key {key_id} comes from the config file and cannot be revoked here")
        key = await self._store.revoke(key_id)
        if key is None:
            raise NotFound(f"no API key with id {key_id!r}")
        self._recent.forget(key_id)
        log.info("revoked API key %s of tenant %s", key.key_id, key.tenant_id)
        return key
