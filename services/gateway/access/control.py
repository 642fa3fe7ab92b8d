"""Who may call, and how much: API-key authentication and per-key limits, in front of every RPC.

Availability over strictness when Redis is down:
- keys from the config file keep working (they are checked in memory); keys created through the admin
  API cannot be checked and get UNAVAILABLE "key store unavailable";
- rate limits are not enforced (fail open): an outage of the counter store should not take the whole API
  down with it.
While Redis is known to be down (its breaker is open, see `redis_breaker`) it is not asked at all, so
requests pay no timeouts, and the outage is logged once, its end once.

Revocation: a replica remembers keys it found in Redis for `gateway.key_cache_seconds`. The replica
that revokes a key forgets it at once; every other replica stops accepting it within that time. A
rotation's grace period and a key's expiry end on time everywhere (the remembered entry carries them).

Keys are tenant keys (the data plane, possibly scoped to models and endpoints) or admin keys (the admin
API, with a role and possibly scoped to tenants); either used for the other's API is PERMISSION_DENIED.
When each key was last used is written to Redis at most once a minute per replica, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from redis.asyncio import Redis

from libs.breaker import DependencyBreaker
from libs.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from libs.redis_store import redis_ping_probe
from services.gateway.access.api_keys import ApiKey, KeyRing, bearer_token, key_digest
from services.gateway.access.key_store import SECRET_PREFIX, KeyStore, NewKey, RecentKeys
from services.gateway.access.rate_limits import NO_HOLD, RateLimiter, TokenHold
from services.gateway.access.roles import AdminPrincipal
from services.gateway.domain import Principal

log = logging.getLogger(__name__)

MAX_REMEMBERED_KEYS = 10_000
# "Last used" is kept to the minute: written once a minute per replica for the keys used meanwhile.
LAST_USED_FLUSH_SECONDS = 60.0
# Tokens used by keys with no request since are added to their windows, and the unused requests of ended
# leases given back, this often (rate_limits.py).
CHARGE_FLUSH_SECONDS = 0.1
# How soon a replica that lost its subscription to key changes tries again.
CHANGES_RESUBSCRIBE_SECONDS = 1.0
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
        self._used: dict[str, int] = {}  # key id → Unix seconds, not yet written to Redis
        self._flushers: list[asyncio.Task] = []

    @classmethod
    def over_redis(cls, keys: KeyRing, client: Redis, *, key_cache_seconds: float) -> AccessControl:
        """Config keys from `keys`; stored keys, limits and the breaker over `client`."""
        return cls(
            keys,
            KeyStore(client),
            RateLimiter(client),
            key_cache_seconds=key_cache_seconds,
            breaker=redis_breaker(client),
        )

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

    async def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> ApiKey:
        """The valid, unexpired key presented; Unauthenticated when there is none."""
        token = bearer_token(metadata)
        if not token:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = key_digest(token)
        key = self._keys.find(digest) or self._recent.get(digest)
        if key is None:
            # Every stored key has this prefix: anything else is refused without asking Redis.
            if not token.startswith(SECRET_PREFIX):
                raise Unauthenticated("invalid API key")
            found = await self._redis("key store", lambda: self._store.find(digest))
            if found is None or found.key.revoked:
                raise Unauthenticated("invalid API key")
            now = time.time()
            if found.valid_until and now >= found.valid_until:
                raise Unauthenticated("invalid API key: this secret was rotated and its grace period is over")
            if found.key.expires_at and now >= found.key.expires_at:
                raise Unauthenticated("API key expired")
            key = found.key
            ends = [t for t in (found.valid_until, key.expires_at) if t]
            self._recent.put(digest, key, min(ends) if ends else 0.0)
        self._used[key.key_id] = int(time.time())
        return key

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The tenant key's principal; an admin key is refused here (PERMISSION_DENIED)."""
        key = await self.identify(metadata)
        if key.role is not None:
            raise PermissionDenied(
                f"key {key.key_id} is an admin key (role {key.role.value}); this API needs a tenant key"
            )
        return key.principal

    async def authenticate_admin(self, metadata: Iterable[tuple[str, str | bytes]]) -> AdminPrincipal:
        if not self._keys.admin_enabled and not bearer_token(metadata).startswith(SECRET_PREFIX):
            raise PermissionDenied("the admin API is disabled: set SOPHIA_ADMIN_KEY to enable it")
        key = await self.identify(metadata)
        if key.role is None:
            raise PermissionDenied(f"key {key.key_id} is a tenant key; the admin API needs an admin key")
        return key.admin

    async def admit(self, principal: Principal, estimated_tokens: int) -> TokenHold:
        """Counts one request against the key's limits; raises ResourceExhausted when over them. The hold
        is ended by `charge`, or by the caller when the request fails before it."""
        rpm, tpm = principal.requests_per_minute, principal.tokens_per_minute
        if not rpm and not tpm:
            return NO_HOLD
        try:
            verdict = await self._redis(
                "rate limits", lambda: self._limiter.admit(principal.key_id, rpm, tpm, estimated_tokens)
            )
        except Unavailable:
            return NO_HOLD  # fail open; the breaker logged the outage
        if isinstance(verdict, TokenHold):
            return verdict
        raise ResourceExhausted(
            f"rate limit exceeded: {verdict.limit} {verdict.unit} per minute for key {principal.key_id}",
            trailers=(("retry-after", str(verdict.retry_after_seconds)),),
        )

    def charge(self, principal: Principal, tokens: int, hold: TokenHold = NO_HOLD) -> None:
        """Adds the tokens a finished request really used to the key's tokens-per-minute window: with the
        key's next call to Redis, or within CHARGE_FLUSH_SECONDS (see rate_limits.py); its estimate no
        longer counts."""
        hold.end()
        if not principal.tokens_per_minute or tokens <= 0:
            return
        if not self._breaker.allows():
            return  # limits are not enforced while Redis is down: nothing to keep for later
        self._limiter.charge(principal.key_id, tokens)

    async def flush_charges(self) -> None:
        """Pays the limiter's debts to Redis: tokens not yet added, unused requests of ended leases."""
        owed = self._limiter.take_owed()
        if not owed or not self._breaker.allows():
            return  # Redis not asked (an empty flush must not count as Redis answering), or down: dropped
        try:
            await self._redis("rate limits", lambda: self._limiter.settle(owed))
        except Unavailable:
            log.debug("rate-limit counts not settled: Redis unavailable")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._flushers = [
            loop.create_task(self._flush_last_used_forever()),
            loop.create_task(self._flush_charges_forever()),
            loop.create_task(self._forget_changed_keys_forever()),
        ]

    async def _forget_changed_keys_forever(self) -> None:
        """Drops a key rotated or revoked by any replica the moment it is announced. While not subscribed
        (Redis down) nothing is heard: once subscribed again everything remembered is dropped, and until
        then an entry lasts at most `key_cache_seconds`, as it would without the announcements."""
        while True:
            try:
                async for key_id in self._store.watch_changes():
                    if key_id is None:
                        self._recent.clear()
                    else:
                        self._recent.forget(key_id)
            except Exception as exc:  # Redis gone: the cache's own expiry bounds what is missed
                log.debug("key change announcements interrupted (%s); subscribing again", exc)
            await asyncio.sleep(CHANGES_RESUBSCRIBE_SECONDS)

    async def _flush_charges_forever(self) -> None:
        while True:
            await asyncio.sleep(CHARGE_FLUSH_SECONDS)
            await self.flush_charges()

    async def _flush_last_used_forever(self) -> None:
        while True:
            await asyncio.sleep(LAST_USED_FLUSH_SECONDS)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        used, self._used = self._used, {}
        try:
            await self._redis("key store", lambda: self._store.mark_used(used))
        except Unavailable:
            self._used = {**used, **self._used}  # kept for the next flush

    async def close(self) -> None:
        for flusher in self._flushers:
            flusher.cancel()
        await asyncio.gather(*self._flushers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.flush_charges()
        with contextlib.suppress(Exception):
            await self.flush_last_used()
        await self._breaker.aclose()

    # --- the admin API -------------------------------------------------------------------------------

    async def create_key(self, new: NewKey) -> tuple[ApiKey, str]:
        key, secret = await self._redis("key store", lambda: self._store.create(new))
        log.info("created API key %s for %s", key.key_id, key.tenant_id or f"role {key.role}")
        return key, secret

    async def get_key(self, key_id: str) -> ApiKey:
        """A key by id (config keys included); NotFound for an unknown id."""
        configured = next((key for key in self._keys.keys() if key.key_id == key_id), None)
        if configured is not None:
            return configured
        key = await self._redis("key store", lambda: self._store.get(key_id))
        if key is None:
            raise NotFound(f"no API key with id {key_id!r}")
        return key

    async def list_keys(self, tenant_id: str = "") -> list[ApiKey]:
        """Config keys first (read-only), then stored keys, oldest first; with when each was last used."""
        stored = await self._redis("key store", lambda: self._store.list_keys(tenant_id))
        used = await self._redis("key store", self._store.last_used)
        used |= self._used
        configured = [key for key in self._keys.keys() if not tenant_id or key.tenant_id == tenant_id]
        return [dataclasses.replace(key, last_used=used.get(key.key_id, 0)) for key in configured + stored]

    def _stored_only(self, key_id: str, action: str) -> None:
        if self._keys.owns(key_id):
            raise FailedPrecondition(f"key {key_id} comes from the config file and cannot be {action} here")

    async def rotate_key(self, key_id: str, grace_seconds: int) -> tuple[ApiKey, str]:
        self._stored_only(key_id, "rotated")
        rotated = await self._redis("key store", lambda: self._store.rotate(key_id, grace_seconds))
        if rotated is None:
            await self.get_key(key_id)  # NotFound for an unknown id
            raise FailedPrecondition(f"key {key_id} is revoked and cannot be rotated")
        self._recent.forget(key_id)
        log.info("rotated API key %s (old secret valid for %d s)", key_id, grace_seconds)
        return rotated

    async def revoke_key(self, key_id: str) -> ApiKey:
        self._stored_only(key_id, "revoked")
        key = await self._redis("key store", lambda: self._store.revoke(key_id))
        if key is None:
            raise NotFound(f"no API key with id {key_id!r}")
        self._recent.forget(key_id)
        log.info("revoked API key %s", key.key_id)
        return key
