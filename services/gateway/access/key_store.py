"""API keys created through the admin API, stored in Redis and shared by every Gateway replica.

Only the SHA-256 digest of a secret is stored. All keys carry one hash tag, so in Redis Cluster they
share a slot and the scripts below may touch them together:

    gateway:{apikeys}:digest:<sha256>   hash   key_id, tenant_id, name, requests_per_minute,
                                               tokens_per_minute, created, revoked
    gateway:{apikeys}:ids               hash   key_id → digest (listing, revocation by id)

Revoked keys stay (marked revoked) so that listings keep their history.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as redis

from libs.redis_store import unavailable_when_redis_fails
from services.gateway.access.api_keys import ApiKey, key_digest
from services.gateway.domain import Principal

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-sophia-"
KEY_ID_PREFIX = "key_"
_RECORD_PREFIX = "gateway:{apikeys}:digest:"
_IDS = "gateway:{apikeys}:ids"

# Claims the key id and writes the record in one step: a reader never sees one without the other.
# KEYS: id index, record. ARGV: key id, digest, record fields…
_CREATE_SCRIPT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
return 1
"""

# Marks the key revoked and returns its record, or nothing for an unknown id. The record's name is
# built from KEYS[2] (a prefix with the same hash tag, hence the same slot) and the digest found.
# KEYS: id index, record prefix. ARGV: key id.
_REVOKE_SCRIPT = """
local digest = redis.call('HGET', KEYS[1], ARGV[1])
if not digest then
  return nil
end
local record = KEYS[2] .. digest
if redis.call('EXISTS', record) == 0 then
  return nil
end
redis.call('HSET', record, 'revoked', 1)
return redis.call('HGETALL', record)
"""


def new_secret() -> str:
    # 24 random bytes → 32 URL-safe characters (192 bits).
    return SECRET_PREFIX + secrets.token_urlsafe(24)


def _from_hash(fields: dict[str, str]) -> ApiKey:
    return ApiKey(
        key_id=fields["key_id"],
        tenant_id=fields["tenant_id"],
        name=fields.get("name", ""),
        requests_per_minute=int(fields.get("requests_per_minute", 0)),
        tokens_per_minute=int(fields.get("tokens_per_minute", 0)),
        created=int(fields.get("created", 0)),
        revoked=fields.get("revoked") == "1",
    )


class KeyStore:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._create = client.register_script(_CREATE_SCRIPT)
        self._revoke = client.register_script(_REVOKE_SCRIPT)

    async def create(
        self, tenant_id: str, name: str, requests_per_minute: int, tokens_per_minute: int
    ) -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is not kept anywhere."""
        secret = new_secret()
        digest = key_digest(secret)
        with unavailable_when_redis_fails("key store"):
            while True:
                key = ApiKey(
                    key_id=KEY_ID_PREFIX + secrets.token_hex(6),
                    tenant_id=tenant_id,
                    name=name,
                    requests_per_minute=requests_per_minute,
                    tokens_per_minute=tokens_per_minute,
                    created=int(time.time()),
                )
                fields = {
                    "key_id": key.key_id,
                    "tenant_id": key.tenant_id,
                    "name": key.name,
                    "requests_per_minute": key.requests_per_minute,
                    "tokens_per_minute": key.tokens_per_minute,
                    "created": key.created,
                    "revoked": 0,
                }
                flat = [item for pair in fields.items() for item in pair]
                # 48 random bits: a clash is astronomically rare, but it must not overwrite a key.
                if await self._create(keys=[_IDS, _RECORD_PREFIX + digest], args=[key.key_id, digest, *flat]):
                    return key, secret

    async def find(self, digest: str) -> ApiKey | None:
        with unavailable_when_redis_fails("key store"):
            fields = await self._redis.hgetall(_RECORD_PREFIX + digest)
        return _from_hash(fields) if fields else None

    async def list_keys(self, tenant_id: str = "") -> list[ApiKey]:
        with unavailable_when_redis_fails("key store"):
            digests = await self._redis.hvals(_IDS)
            async with self._redis.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.hgetall(_RECORD_PREFIX + digest)
                records = await pipe.execute()
        keys = [_from_hash(fields) for fields in records if fields]
        if tenant_id:
            keys = [key for key in keys if key.tenant_id == tenant_id]
        return sorted(keys, key=lambda key: (key.created, key.key_id))

    async def revoke(self, key_id: str) -> ApiKey | None:
        """The revoked key (revoking twice is harmless), or None when no key has this id."""
        with unavailable_when_redis_fails("key store"):
            flat = await self._revoke(keys=[_IDS, _RECORD_PREFIX], args=[key_id])
        if not flat:
            return None
        return _from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))


class RecentKeys:
    """Principals of Redis keys seen lately, so that the hot path skips Redis for `ttl_seconds`.

    Bounded: beyond `max_entries` the least recently stored entry goes. Only keys that exist and are
    not revoked are kept; unknown keys are looked up every time.
    """

    def __init__(
        self, ttl_seconds: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expires, principal = entry
        if self._clock() >= expires:
            del self._entries[digest]
            return None
        return principal

    def put(self, digest: str, principal: Principal) -> None:
        if self._ttl <= 0:
            return
        self._entries.pop(digest, None)
        self._entries[digest] = (self._clock() + self._ttl, principal)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drops a revoked key at once (on this replica; the others forget it when their entry expires)."""
        for digest in [d for d, (_, principal) in self._entries.items() if principal.key_id == key_id]:
            del self._entries[digest]

    def __len__(self) -> int:
        return len(self._entries)
