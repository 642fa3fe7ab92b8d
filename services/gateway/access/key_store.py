"""API keys created through the admin API, stored in Redis and shared by every Gateway replica.

Only SHA-256 digests of secrets are stored. A key has one record and one or more secrets: rotation issues
a new secret and leaves the old one valid for a grace period. All keys carry one hash tag, so in Redis
Cluster they share a slot and the scripts below may touch them together:

    gateway:{apikeys}:key:<key_id>      hash   key_id, tenant_id, name, requests_per_minute,
                                               tokens_per_minute, created, revoked, role, tenants,
                                               models, endpoints, expires_at, rotated_at, digest
    gateway:{apikeys}:digest:<sha256>   hash   key_id, valid_until (0: the current secret)
    gateway:{apikeys}:last-used         hash   key_id → Unix seconds (written at most once a minute)

Revoked keys stay (marked revoked) so that listings keep their history; revoking a key stops all of its
secrets at once, because every secret is checked through the key's record.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import redis.asyncio as redis

from libs.redis_store import unavailable_when_redis_fails
from services.gateway.access.api_keys import ApiKey, key_digest
from services.gateway.access.roles import Endpoint, KeyScope, Role

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-sophia-"
KEY_ID_PREFIX = "key_"
_TAG = "gateway:{apikeys}"
_KEY_PREFIX = f"{_TAG}:key:"
_DIGEST_PREFIX = f"{_TAG}:digest:"
CHANGES_CHANNEL = f"{_TAG}:changed"
_LAST_USED = f"{_TAG}:last-used"

# Claims the key id and writes the record and the secret's digest in one step.
# KEYS: record, digest entry. ARGV: key id, record fields…
_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('HSET', KEYS[2], 'key_id', ARGV[1], 'valid_until', 0)
return 1
"""

# A secret's key: {valid_until, record fields…}, or nothing for an unknown secret or key.
# KEYS: digest entry, record prefix.
_FIND_SCRIPT = """
local entry = redis.call('HMGET', KEYS[1], 'key_id', 'valid_until')
if not entry[1] then
  return nil
end
local record = redis.call('HGETALL', KEYS[2] .. entry[1])
if #record == 0 then
  return nil
end
table.insert(record, 1, entry[2])
return record
"""

# Issues a new secret for the key: the old one stays valid until ARGV[3] (or goes at once when that is
# 0), the new one becomes current. Returns the updated record, or nothing for an unknown or revoked key.
# KEYS: record, new digest entry, old digest prefix. ARGV: key id, new digest, old valid until, now.
_ROTATE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'revoked') ~= '0' then
  return nil
end
local old = KEYS[3] .. redis.call('HGET', KEYS[1], 'digest')
if tonumber(ARGV[3]) > 0 then
  redis.call('HSET', old, 'valid_until', ARGV[3])
  redis.call('EXPIREAT', old, tonumber(ARGV[3]) + 60)
else
  redis.call('DEL', old)
end
redis.call('HSET', KEYS[2], 'key_id', ARGV[1], 'valid_until', 0)
redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'rotated_at', ARGV[4])
return redis.call('HGETALL', KEYS[1])
"""

# Marks the key revoked and returns its record, or nothing for an unknown id. KEYS: record.
_REVOKE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return nil
end
redis.call('HSET', KEYS[1], 'revoked', 1)
return redis.call('HGETALL', KEYS[1])
"""


def new_secret() -> str:
    # 24 random bytes → 32 URL-safe characters (192 bits).
    return SECRET_PREFIX + secrets.token_urlsafe(24)


@dataclass(frozen=True)
class NewKey:
    """What the admin API asks for when it creates a key."""

    tenant_id: str  # "" for an admin key
    name: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    role: Role | None = None
    tenants: tuple[str, ...] = ()
    scope: KeyScope = field(default_factory=KeyScope)
    expires_at: int = 0


@dataclass(frozen=True)
class StoredSecret:
    """A secret's key, and until when that secret is valid (0: it is the key's current secret)."""

    key: ApiKey
    valid_until: int


def _from_hash(fields: dict[str, str], last_used: int = 0) -> ApiKey:
    role = fields.get("role", "")
    return ApiKey(
        key_id=fields["key_id"],
        tenant_id=fields.get("tenant_id", ""),
        name=fields.get("name", ""),
        requests_per_minute=int(fields.get("requests_per_minute", 0)),
        tokens_per_minute=int(fields.get("tokens_per_minute", 0)),
        created=int(fields.get("created", 0)),
        revoked=fields.get("revoked") == "1",
        role=Role(role) if role else None,
        tenants=tuple(json.loads(fields.get("tenants", "[]"))),
        scope=KeyScope(
            tuple(json.loads(fields.get("models", "[]"))),
            tuple(Endpoint(e) for e in json.loads(fields.get("endpoints", "[]"))),
        ),
        expires_at=int(fields.get("expires_at", 0)),
        rotated_at=int(fields.get("rotated_at", 0)),
        last_used=last_used,
    )


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class KeyStore:
    """Stored keys in Redis. A rotation or revocation is also announced on CHANGES_CHANNEL, so that every
    Gateway replica drops what it remembers of that key at once (see `AccessControl`)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._create = client.register_script(_CREATE_SCRIPT)
        self._find = client.register_script(_FIND_SCRIPT)
        self._rotate = client.register_script(_ROTATE_SCRIPT)
        self._revoke = client.register_script(_REVOKE_SCRIPT)

    async def create(self, new: NewKey) -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is not kept anywhere."""
        secret = new_secret()
        digest = key_digest(secret)
        with unavailable_when_redis_fails("key store"):
            while True:
                key_id = KEY_ID_PREFIX + secrets.token_hex(6)
                fields = {
                    "key_id": key_id,
                    "tenant_id": new.tenant_id,
                    "name": new.name,
                    "requests_per_minute": new.requests_per_minute,
                    "tokens_per_minute": new.tokens_per_minute,
                    "created": int(time.time()),
                    "revoked": 0,
                    "role": new.role.value if new.role else "",
                    "tenants": json.dumps(list(new.tenants)),
                    "models": json.dumps(list(new.scope.models)),
                    "endpoints": json.dumps([e.value for e in new.scope.endpoints]),
                    "expires_at": new.expires_at,
                    "rotated_at": 0,
                    "digest": digest,
                }
                flat = [item for pair in fields.items() for item in pair]
                # 48 random bits: a clash is astronomically rare, but it must not overwrite a key.
                if await self._create(
                    keys=[_KEY_PREFIX + key_id, _DIGEST_PREFIX + digest], args=[key_id, *flat]
                ):
                    return _from_hash({k: str(v) for k, v in fields.items()}), secret

    async def find(self, digest: str) -> StoredSecret | None:
        with unavailable_when_redis_fails("key store"):
            found = await self._find(keys=[_DIGEST_PREFIX + digest, _KEY_PREFIX])
        if not found:
            return None
        return StoredSecret(_from_hash(_pairs(found[1:])), int(found[0] or 0))

    async def get(self, key_id: str) -> ApiKey | None:
        with unavailable_when_redis_fails("key store"):
            fields = await self._redis.hgetall(_KEY_PREFIX + key_id)
        return _from_hash(fields) if fields else None

    async def list_keys(self, tenant_id: str = "") -> list[ApiKey]:
        with unavailable_when_redis_fails("key store"):
            names = [name async for name in self._redis.scan_iter(match=f"{_KEY_PREFIX}*", count=1000)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(name)
                records = await pipe.execute()
            last_used = await self._redis.hgetall(_LAST_USED)
        keys = [_from_hash(f, int(last_used.get(f["key_id"], 0))) for f in records if f]
        if tenant_id:
            keys = [key for key in keys if key.tenant_id == tenant_id]
        return sorted(keys, key=lambda key: (key.created, key.key_id))

    async def rotate(self, key_id: str, grace_seconds: int) -> tuple[ApiKey, str] | None:
        """A new secret for the key (limits, scope and id unchanged); the old secret stays valid for
        `grace_seconds` (0: it stops at once). None for an unknown or revoked key."""
        secret = new_secret()
        now = math.ceil(time.time())  # rounded up: the grace period is never shorter than asked
        old_valid_until = now + grace_seconds if grace_seconds > 0 else 0
        with unavailable_when_redis_fails("key store"):
            flat = await self._rotate(
                keys=[_KEY_PREFIX + key_id, _DIGEST_PREFIX + key_digest(secret), _DIGEST_PREFIX],
                args=[key_id, key_digest(secret), old_valid_until, now],
            )
            if flat:
                await self._redis.publish(CHANGES_CHANNEL, key_id)
        return (_from_hash(_pairs(flat)), secret) if flat else None

    async def revoke(self, key_id: str) -> ApiKey | None:
        """The revoked key (revoking twice is harmless), or None when no key has this id."""
        with unavailable_when_redis_fails("key store"):
            flat = await self._revoke(keys=[_KEY_PREFIX + key_id])
            if flat:
                await self._redis.publish(CHANGES_CHANNEL, key_id)
        return _from_hash(_pairs(flat)) if flat else None

    async def watch_changes(self) -> AsyncIterator[str | None]:
        """The ids of keys rotated or revoked from now on, by any replica; None first, once subscribed: what
        was announced before is unknown. Ends with an error when the connection does."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANGES_CHANNEL)
            yield None
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and message["type"] == "message":
                    yield message["data"]
        finally:
            await pubsub.aclose()

    async def mark_used(self, used: dict[str, int]) -> None:
        """Records when keys were last used (key id → Unix seconds), in one command."""
        if used:
            with unavailable_when_redis_fails("key store"):
                await self._redis.hset(_LAST_USED, mapping=used)

    async def last_used(self) -> dict[str, int]:
        with unavailable_when_redis_fails("key store"):
            found = await self._redis.hgetall(_LAST_USED)
        return {key_id: int(seconds) for key_id, seconds in found.items()}


@dataclass(frozen=True)
class _Remembered:
    expires: float  # monotonic: when this replica asks Redis again
    valid_until: float  # wall clock: when the secret stops (grace end or key expiry); 0: no end
    key: ApiKey


class RecentKeys:
    """Keys of secrets seen lately in Redis, so that the hot path skips Redis for `ttl_seconds`.

    Bounded: beyond `max_entries` the least recently stored entry goes. Only keys that exist and are
    not revoked are kept; unknown secrets are looked up every time. An entry keeps the moment its secret
    stops being valid, so a rotation's grace period and a key's expiry end on time on every replica,
    cached or not.
    """

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._wall_clock = wall_clock
        self._entries: OrderedDict[str, _Remembered] = OrderedDict()

    def get(self, digest: str) -> ApiKey | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if self._clock() >= entry.expires or (entry.valid_until and self._wall_clock() >= entry.valid_until):
            del self._entries[digest]
            return None
        return entry.key

    def put(self, digest: str, key: ApiKey, valid_until: float) -> None:
        if self._ttl <= 0:
            return
        self._entries.pop(digest, None)
        self._entries[digest] = _Remembered(self._clock() + self._ttl, valid_until, key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drops a revoked or rotated key at once."""
        for digest in [d for d, entry in self._entries.items() if entry.key.key_id == key_id]:
            del self._entries[digest]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
