"""Per-key requests-per-minute and tokens-per-minute limits, counted in Redis and shared by all replicas.

Fixed one-minute windows aligned to Redis' own clock (TIME inside the scripts), so replicas whose clocks
differ still agree on which window a request falls in:

    gateway:ratelimit:{<key_id>}:<minute since the epoch>   hash   requests, tokens   (expires in 2 min)

`admit` checks and counts a request in one script: however many replicas ask at once, no more than the
limit are admitted in a window. `charge` notes the tokens a finished request really used; they are added
by the key's next `admit` (in the same script call, before its check) or by `flush` (every 100 ms, for
keys with no request meanwhile), so a request costs one Redis call, not two. The scripts get
the key prefix (with the key id as hash tag) and append the window themselves; every key they touch
shares the prefix's Redis Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as redis

from libs.redis_store import run_script_calls, unavailable_when_redis_fails

WINDOW_SECONDS = 60
# A window's counters outlive it a little, for requests charged just after it closed.
WINDOW_EXPIRY_SECONDS = 2 * WINDOW_SECONDS

# KEYS: counter prefix. ARGV: requests per minute, tokens per minute, estimated tokens (limits 0 = none),
# tokens used since the last call (charged first). Returns {0} when admitted (and counted), {1, retry_after}
# over the request limit, {2, retry_after} over the token limit. Refused requests are not counted.
_ADMIT_SCRIPT = f"""
local second = tonumber(redis.call('TIME')[1])
local window = KEYS[1] .. ':' .. math.floor(second / {WINDOW_SECONDS})
local rpm, tpm, estimate, used = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if used > 0 then
  redis.call('HINCRBY', window, 'tokens', used)
  redis.call('EXPIRE', window, {WINDOW_EXPIRY_SECONDS})
end
local counts = redis.call('HMGET', window, 'requests', 'tokens')
local requests, tokens = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
local retry_after = {WINDOW_SECONDS} - second % {WINDOW_SECONDS}
if rpm > 0 and requests >= rpm then
  return {{1, retry_after}}
end
if tpm > 0 and (tokens >= tpm or (tokens > 0 and tokens + estimate > tpm)) then
  return {{2, retry_after}}
end
redis.call('HINCRBY', window, 'requests', 1)
redis.call('EXPIRE', window, {WINDOW_EXPIRY_SECONDS})
return {{0, 0}}
"""

# KEYS: counter prefix. ARGV: tokens used.
_CHARGE_SCRIPT = f"""
local second = tonumber(redis.call('TIME')[1])
local window = KEYS[1] .. ':' .. math.floor(second / {WINDOW_SECONDS})
redis.call('HINCRBY', window, 'tokens', ARGV[1])
redis.call('EXPIRE', window, {WINDOW_EXPIRY_SECONDS})
return 0
"""


@dataclass(frozen=True)
class Refusal:
    unit: Literal["requests", "tokens"]
    limit: int
    # Whole seconds until the current window closes (1–60).
    retry_after_seconds: int


def _prefix(key_id: str) -> str:
    return "gateway:ratelimit:{" + key_id + "}"


class RateLimiter:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._admit = client.register_script(_ADMIT_SCRIPT)
        self._charge = client.register_script(_CHARGE_SCRIPT)
        self._unpaid: dict[str, int] = {}  # key id → tokens charged here, not yet added in Redis

    async def admit(
        self, key_id: str, requests_per_minute: int, tokens_per_minute: int, estimated_tokens: int
    ) -> Refusal | None:
        """Counts one request, or says why it may not run now.

        Token rule: refused once the window's charged tokens reach the limit, or when they plus this
        request's estimate would pass it — except in a window with nothing charged yet, so that a request
        estimated above the whole limit still runs once a minute instead of never.
        """
        # Lost if the call fails: limits fail open while Redis is in trouble, tokens are not kept for it.
        unpaid = self._unpaid.pop(key_id, 0)
        with unavailable_when_redis_fails("rate limiter"):
            verdict, retry_after = await self._admit(
                keys=[_prefix(key_id)],
                args=[requests_per_minute, tokens_per_minute, max(estimated_tokens, 0), unpaid],
            )
        if verdict == 0:
            return None
        if verdict == 1:
            return Refusal("requests", requests_per_minute, int(retry_after))
        return Refusal("tokens", tokens_per_minute, int(retry_after))

    def charge(self, key_id: str, tokens: int) -> None:
        """Notes tokens a finished request used, for the key's next `admit` or the next `flush`."""
        self._unpaid[key_id] = self._unpaid.get(key_id, 0) + tokens

    @property
    def has_unpaid_tokens(self) -> bool:
        return bool(self._unpaid)

    def forget_charges(self) -> None:
        self._unpaid.clear()

    async def flush(self) -> None:
        """Adds every key's unpaid tokens in one round trip (dropped if Redis fails, as limits fail open)."""
        if not self._unpaid:
            return
        unpaid, self._unpaid = self._unpaid, {}
        calls = [([_prefix(key_id)], [tokens]) for key_id, tokens in unpaid.items()]
        with unavailable_when_redis_fails("rate limiter"):
            await run_script_calls(self._client, self._charge, calls)
