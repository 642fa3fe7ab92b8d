"""Cache entries in Redis, the source of truth for both layers (key layout in keys.py).

A store is one Lua script, so that the entry, its place in the tenant's expiry set, the eviction of the
soonest-expiring entries beyond the tenant's limit and the events other replicas follow happen together
or not at all.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis

from services.cache import keys

# Keys asked per SCAN step: large enough to walk a namespace in few round trips, small enough that no
# single step holds Redis (which serves the rate limiter too) for long.
SCAN_BATCH = 500
# Events kept in the stream (approximately): replicas more than this far behind rebuild from a scan.
EVENTS_KEPT = 100_000
DELETE_BATCH = 500

# KEYS: entry, expiry set, event stream, answered set. ARGV: now_ms, expire_at_ms, member, limit, entry
# prefix, events kept, the answering model's tag ('' when it is the requested model), then the entry's
# field/value pairs. An entry's item in the answered set goes wherever the entry goes (replaced or evicted
# here, invalidated in `invalidate`), so the set never names another entry under the same member later;
# items of expired entries are trimmed by score, like the expiry set's.
_STORE = """
local function unlist_answered(key, member)
  local tag = redis.call('HGET', key, 'answered')
  if tag then redis.call('ZREM', KEYS[4], tag .. ':' .. member) end
end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
unlist_answered(KEYS[1], ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIREAT', KEYS[2], redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[4], ARGV[2], ARGV[7] .. ':' .. ARGV[3]) end
if redis.call('ZCARD', KEYS[4]) > 0 then
  redis.call('PEXPIREAT', KEYS[4], redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')[2])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'op', 'put', 'key', KEYS[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if excess <= 0 then return {} end
local evicted = {}
local popped = redis.call('ZPOPMIN', KEYS[2], excess)
for i = 1, #popped, 2 do
  local key = ARGV[5] .. popped[i]
  unlist_answered(key, popped[i])
  redis.call('UNLINK', key)
  evicted[#evicted + 1] = key
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'op', 'del', 'keys', table.concat(evicted, ' '))
return evicted
"""


@dataclass(frozen=True)
class StoredEntry:
    key: str
    question: str
    response: bytes
    scope: str
    answer_end: str
    vector: bytes  # float32, empty when the entry is not in the semantic index
    expires_at: float  # unix seconds


FIELDS = (b"question", b"response", b"scope", b"end", b"vector")


class EntryStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._store = redis.register_script(_STORE)

    async def put(
        self,
        tenant_id: str,
        member: str,
        fields: dict[str, bytes | str],
        ttl_seconds: int,
        max_entries: int,
        answered_by: str | None = None,
    ) -> tuple[float, list[str]]:
        """Writes the entry; returns its expiry (unix seconds) and the keys of the entries evicted to make
        room. `answered_by`: the model that gave the answer, when it is not the one the entry is stored
        under (a fallback), so that invalidating that model removes this entry too."""
        now_ms = int(time.time() * 1000)
        answered_tag = keys.namespace_tag("model", answered_by) if answered_by is not None else ""
        args: list[bytes | str | int] = [
            now_ms, now_ms + ttl_seconds * 1000, member, max_entries,
            keys.entry_prefix(tenant_id), EVENTS_KEPT, answered_tag,
        ]  # fmt: skip
        for name, value in fields.items():
            args += [name, value]
        if answered_tag:
            args += ["answered", answered_tag]
        evicted = await self._store(
            keys=[
                keys.entry_key(tenant_id, member), keys.expiry_key(tenant_id), keys.EVENTS,
                keys.answered_key(tenant_id),
            ],
            args=args,
        )  # fmt: skip
        expires_at = (now_ms + ttl_seconds * 1000) / 1000
        return expires_at, [key.decode() if isinstance(key, bytes) else key for key in evicted]

    async def read_for_judge(self, entry_keys: list[str]) -> tuple[bytes | None, list[str | None]]:
        """The first entry's response, and every entry's question (None: the entry is gone), in one round
        trip: the semantic judge's candidates, best first."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(entry_keys[0], ["response", "question"])
            for key in entry_keys[1:]:
                pipe.hget(key, "question")
            (response, first), *others = await pipe.execute()
        questions = [first, *others]
        return response, [_text(question) if question is not None else None for question in questions]

    async def read(self, key: str) -> StoredEntry | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, FIELDS)
            pipe.pexpiretime(key)
            values, expire_ms = await pipe.execute()
        return _entry(key, values, expire_ms)

    async def read_many(self, entry_keys: list[str]) -> list[StoredEntry]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in entry_keys:
                pipe.hmget(key, FIELDS)
                pipe.pexpiretime(key)
            results = await pipe.execute()
        found = (_entry(key, results[2 * i], results[2 * i + 1]) for i, key in enumerate(entry_keys))
        return [entry for entry in found if entry is not None]

    async def scan_keys(self) -> AsyncIterator[list[str]]:
        """Every entry key, in batches (SCAN may return a key twice; callers are idempotent)."""
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=f"{keys.ENTRY}:*", count=SCAN_BATCH):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= SCAN_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    async def invalidate(self, tenant_id: str, model: str | None) -> list[str]:
        """Deletes the tenant's entries (of one model, or all) and returns the keys that existed. An entry is
        a model's when it was stored under that model's name or answered by it (entries stored before the
        answering model was recorded are found by the first only)."""
        expiry, answered = keys.expiry_key(tenant_id), keys.answered_key(tenant_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrange(expiry, 0, -1)
            pipe.zrange(answered, 0, -1)
            listed, answered_listed = await pipe.execute()
        members = [_text(member) for member in listed]
        # member → its items in the answered set (`<answering model tag>:<member>`; tags hold no ':').
        answers: dict[str, list[str]] = {}
        for item in map(_text, answered_listed):
            answers.setdefault(item.split(":", 1)[1], []).append(item)
        if model is not None:
            prefix = keys.model_member_prefix(model)
            chosen = dict.fromkeys(member for member in members if member.startswith(prefix))
            # Answered by `model` under another name; possibly expired already (then not counted below).
            chosen |= dict.fromkeys(
                member for member, items in answers.items() if any(item.startswith(prefix) for item in items)
            )
            members = list(chosen)
        else:
            members = list(dict.fromkeys([*members, *answers]))
        removed: list[str] = []
        for start in range(0, len(members), DELETE_BATCH):
            chunk = members[start : start + DELETE_BATCH]
            entry_keys = [keys.entry_key(tenant_id, member) for member in chunk]
            items = [item for member in chunk for item in answers.get(member, ())]
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in entry_keys:
                    pipe.unlink(key)
                pipe.zrem(expiry, *chunk)
                if items:
                    pipe.zrem(answered, *items)
                pipe.xadd(keys.EVENTS, {"op": "del", "keys": " ".join(entry_keys)}, maxlen=EVENTS_KEPT)
                results = await pipe.execute()
            # UNLINK answers 0 for a key that had expired already: it is not counted as removed.
            removed += [key for key, existed in zip(entry_keys, results, strict=False) if existed]
        return removed

    async def count(self, tenant_id: str) -> int:
        return await self._redis.zcount(keys.expiry_key(tenant_id), int(time.time() * 1000) + 1, "+inf")

    async def last_event_id(self) -> str:
        last = await self._redis.xrevrange(keys.EVENTS, count=1)
        if not last:
            return "0-0"
        event_id = last[0][0]
        return event_id.decode() if isinstance(event_id, bytes) else event_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(key: str, values: list[bytes | None], expire_ms: int) -> StoredEntry | None:
    question, response, scope, end, vector = values
    if response is None or expire_ms is None or expire_ms < 0:
        return None
    return StoredEntry(
        key=key,
        question=(question or b"").decode(),
        response=response,
        scope=(scope or b"").decode(),
        answer_end=(end or b"complete").decode(),
        vector=vector or b"",
        expires_at=expire_ms / 1000,
    )
