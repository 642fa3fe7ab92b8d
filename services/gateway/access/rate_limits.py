"""Per-key requests-per-minute and tokens-per-minute limits, counted in Redis and shared by all replicas.

Fixed one-minute windows aligned to Redis' own clock (TIME inside the scripts), so replicas whose clocks
differ still agree on which window a request falls in:

    gateway:ratelimit:{<key_id>}:<minute since the epoch>   hash   requests, tokens   (expires in 2 min)

Leases: asking Redis for every request would cost a script call per request (a tenth of the Gateway's CPU
under load). Instead a replica takes a *lease*: the admit script counts a few requests at once in the
window and the replica admits that many itself, for at most LEASE_SECONDS. Redis' count is never below
what the replicas admitted, so the limit holds exactly however many replicas share a key:
- a lease is sized to the key's recent rate on this replica (LEASE_SECONDS of its requests), and never
  more than a quarter of what is left in the window, so the last requests of a window are counted one
  Redis call at a time and no replica sits on requests another replica needs;
- the unused part of a lease is given back when it ends (with the key's next call to Redis, or by the flush),
  so requests a replica did not use are free again within LEASE_SECONDS plus one flush;
- a lease ends with its window at the latest;
- a replica makes one call to Redis per key at a time: the requests that find the lease used up wait
  for the call under way and admit from the lease it brings, which it asks big enough for them too; those
  it cannot hold wait for the next call. A burst on one key thus costs a few calls, not one per request
  (which would take every pooled connection, and a pool that fails looks like Redis being down: limits
  off for every key). A waiter takes the call's refusal if Redis would refuse it too (`Refusal.refuses`:
  the request limit, or the token limit for an estimate at least as large); when the call fails, the
  waiters try once more together, and fail with the second failure (limits fail open, as for any failed
  call);
- a lease's unused requests go back only to a window that still counts them, never below zero (after a
  Redis restart or failover the window may be gone: a negative count would admit more than the limit).
A quiet key (under one request per lease) is counted by Redis request by request, as before leases.

Tokens: `charge` notes the tokens a finished request used; they are added by the key's next call to
Redis or by a flush (`take_owed` and `settle`, every 100 ms); a call that fails or is cancelled keeps
them owed (counted twice at worst, never lost). Until then a request's estimate counts as used on its
replica (a `TokenHold`, ended by the charge or when the request fails), so requests arriving together
cannot all pass a check that only finished requests had been counted in. A replica admits from its lease
only while the window's tokens as Redis last reported them, plus what this replica charged since and the
estimates of the key's requests it has running, pass the check (Redis checks them too);
otherwise it asks Redis, which decides. Refusals always come from Redis. The scripts get the key prefix
(with the key id as hash tag) and append the window themselves; every key they touch shares the
prefix's Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as redis

from libs.errors import Unavailable
from libs.redis_store import run_script_calls, unavailable_when_redis_fails

WINDOW_SECONDS = 60
# A window's counters outlive it a little, for requests charged just after it closed.
WINDOW_EXPIRY_SECONDS = 2 * WINDOW_SECONDS
# How long a replica admits from one lease: also how late another replica sees that it did not need it.
LEASE_SECONDS = 0.1
MAX_LEASE_REQUESTS = 1000
# A lease takes at most 1/LEASE_SHARE_DIVISOR of the requests left in the window (at least one).
LEASE_SHARE_DIVISOR = 4

# Applies what a replica owes, then checks. KEYS: counter prefix. ARGV: tokens used since the last call,
# requests given back, the window they were counted in.
_SETTLE = f"""
local now = redis.call('TIME')
local second = tonumber(now[1])
local minute = math.floor(second / {WINDOW_SECONDS})
local window = KEYS[1] .. ':' .. minute
local used, returned, returned_minute = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if used > 0 then
  redis.call('HINCRBY', window, 'tokens', used)
  redis.call('EXPIRE', window, {WINDOW_EXPIRY_SECONDS})
end
if returned > 0 and returned_minute == minute then
  -- Only to a window that still counts requests, never below zero: after a Redis restart or failover the
  -- window may be gone or younger than the lease, and a negative count (with no expiry) would admit more.
  local requests = tonumber(redis.call('HGET', window, 'requests'))
  if requests then
    redis.call('HINCRBY', window, 'requests', -math.min(returned, requests))
  end
end
"""

# ARGV[4..]: requests per minute, tokens per minute, estimated tokens (limits 0 = none), requests wanted,
# tokens of the requests this replica has running (checked as if charged, not counted).
# Returns {0, granted, window tokens, window, ms left in it} when admitted (granted ≥ 1 requests counted,
# this one included), {1, retry_after} over the request limit, {2, retry_after} over the token limit.
# Refused requests are not counted.
_ADMIT_SCRIPT = (
    _SETTLE
    + f"""
local rpm, tpm, estimate, wanted = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local running = tonumber(ARGV[8])
local counts = redis.call('HMGET', window, 'requests', 'tokens')
local requests, tokens = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
local retry_after = {WINDOW_SECONDS} - second % {WINDOW_SECONDS}
if rpm > 0 and requests >= rpm then
  return {{1, retry_after}}
end
local seen = tokens + running
if tpm > 0 and (seen >= tpm or (seen > 0 and seen + estimate > tpm)) then
  return {{2, retry_after}}
end
local granted = wanted
if rpm > 0 then
  granted = math.min(wanted, math.max(1, math.floor((rpm - requests) / {LEASE_SHARE_DIVISOR})))
end
redis.call('HINCRBY', window, 'requests', granted)
redis.call('EXPIRE', window, {WINDOW_EXPIRY_SECONDS})
return {{0, granted, tokens, minute, retry_after * 1000 - math.floor(tonumber(now[2]) / 1000)}}
"""
)

_FLUSH_SCRIPT = _SETTLE + "\nreturn 0\n"


@dataclass(frozen=True)
class Refusal:
    unit: Literal["requests", "tokens"]
    limit: int
    # Whole seconds until the current window closes (1–60).
    retry_after_seconds: int
    # The refused request's estimate (a tokens refusal): one as large is refused too.
    estimated_tokens: int = 0

    def refuses(self, limits: tuple[int, int, int]) -> bool:
        """Whether Redis would refuse a request with these limits (requests/min, tokens/min, estimate) as
        well, in the same moment: the same request limit, or the same token limit for an estimate at
        least as large."""
        requests_per_minute, tokens_per_minute, estimated_tokens = limits
        if self.unit == "requests":
            return self.limit == requests_per_minute
        return self.limit == tokens_per_minute and estimated_tokens >= self.estimated_tokens


# What a renewal means for the requests that waited for it: Redis' refusal, Redis' failure, or None: try
# the lease (again).
_Outcome = Refusal | Unavailable | None


@dataclass
class _Lease:
    """Requests Redis counted for this replica to admit itself, in one window, until `ends_at`."""

    window: int  # the Redis minute they were counted in
    unused: int
    granted: int
    # As Redis reported them, plus this replica's charges flushed since (those not flushed are in _unpaid).
    window_tokens: int
    taken_at: float  # monotonic seconds
    ends_at: float

    def wanted_next(self, now: float) -> int:
        """LEASE_SECONDS of the key's requests at the rate this lease was used (at least one)."""
        used = self.granted - self.unused
        rate = used / max(now - self.taken_at, 0.001)
        return min(MAX_LEASE_REQUESTS, max(1, math.ceil(rate * LEASE_SECONDS)))


# key id → [tokens used, requests given back, the window they were counted in]
Owed = dict[str, list[int]]


def _prefix(key_id: str) -> str:
    return "gateway:ratelimit:{" + key_id + "}"


def _tokens_allow(window_tokens: int, tokens_per_minute: int, estimated_tokens: int) -> bool:
    """The token rule: refused once the window's tokens (with the estimates of the key's requests still
    running here) reach the limit, or when they plus this request's estimate would pass it — except when
    nothing is charged or running yet, so that a request estimated above the whole limit still runs once a
    minute instead of never (one at a time, not as many as arrive together)."""
    if not tokens_per_minute:
        return True
    if window_tokens >= tokens_per_minute:
        return False
    return window_tokens == 0 or window_tokens + estimated_tokens <= tokens_per_minute


@dataclass(eq=False)  # one request's hold: compared (and hashed) by identity
class TokenHold:
    """A running request's estimated tokens, counted against its key's tokens per minute on this replica
    until `end` (at its charge, or when it fails): ending it twice is harmless."""

    limiter: RateLimiter | None
    key_id: str = ""
    tokens: int = 0

    def end(self) -> None:
        if self.limiter is not None:
            self.limiter.release(self.key_id, self.tokens)
            self.limiter = None


# Nothing held: no tokens-per-minute limit, or limits not enforced (Redis unavailable).
NO_HOLD = TokenHold(None)


class RateLimiter:
    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock
        self._admit_script = client.register_script(_ADMIT_SCRIPT)
        self._flush = client.register_script(_FLUSH_SCRIPT)
        self._unpaid: dict[str, int] = {}  # key id → tokens charged here, not yet added in Redis
        self._leases: dict[str, _Lease] = {}
        # key id → its one call to Redis under way, resolved with what it means for the requests waiting
        self._renewals: dict[str, asyncio.Future[_Outcome]] = {}
        self._waiting: dict[str, int] = {}  # key id → requests waiting for its renewal (absent: none)
        # key id → the estimated tokens of its requests admitted here and not yet charged or released
        self._running: dict[str, int] = {}

    async def admit(
        self, key_id: str, requests_per_minute: int, tokens_per_minute: int, estimated_tokens: int
    ) -> Refusal | TokenHold:
        """Counts one request, or says why it may not run now (the token rule: `_tokens_allow`). Admitted
        under a tokens-per-minute limit, its estimate counts as used here until the hold's `end`."""
        limits = (requests_per_minute, tokens_per_minute, max(estimated_tokens, 0))
        refusal = await self._admit(key_id, limits)
        if refusal is not None:
            return refusal
        if not tokens_per_minute or not limits[2]:
            return NO_HOLD
        self._running[key_id] = self._running.get(key_id, 0) + limits[2]
        return TokenHold(self, key_id, limits[2])

    def release(self, key_id: str, estimated_tokens: int) -> None:
        """A request admitted with `estimated_tokens` has ended: they no longer count as running."""
        left = self._running.get(key_id, 0) - max(estimated_tokens, 0)
        if left > 0:
            self._running[key_id] = left
        else:
            self._running.pop(key_id, None)

    async def _admit(self, key_id: str, limits: tuple[int, int, int]) -> Refusal | None:
        if self._admit_from_lease(key_id, limits):
            return None
        # One call to Redis per key at a time: a burst that finds the lease used up waits for the renewal
        # under way (however many it takes) rather than ask too, so it costs a call or two, not one per
        # request, and cannot take every connection to Redis.
        failed_before = False
        while (renewal := self._renewals.get(key_id)) is not None:
            outcome = await self._wait_for(key_id, renewal)
            if self._admit_from_lease(key_id, limits):
                return None
            if isinstance(outcome, Unavailable):
                # One failed call may be one slow command: the waiters try once more, all on one call. A
                # second failure is theirs too (limits fail open), so a hung Redis costs two timeouts.
                if failed_before:
                    raise Unavailable(outcome.message) from outcome.__cause__
                failed_before = True
            elif isinstance(outcome, Refusal) and outcome.refuses(limits):
                return outcome  # the window filled while this request waited: Redis would say the same
        return await self._renew(key_id, limits)

    def _admit_from_lease(self, key_id: str, limits: tuple[int, int, int]) -> bool:
        lease = self._leases.get(key_id)
        if lease is None or lease.unused <= 0 or self._clock() >= lease.ends_at:
            return False
        _, tokens_per_minute, estimated_tokens = limits
        seen = lease.window_tokens + self._unpaid.get(key_id, 0) + self._running.get(key_id, 0)
        if not _tokens_allow(seen, tokens_per_minute, estimated_tokens):
            return False  # Redis decides
        lease.unused -= 1
        return True

    async def _wait_for(self, key_id: str, renewal: asyncio.Future[_Outcome]) -> _Outcome:
        """The renewal's outcome; while it runs, this request counts in the lease the next one asks for."""
        self._waiting[key_id] = self._waiting.get(key_id, 0) + 1
        try:
            return await asyncio.shield(renewal)
        finally:
            self._waiting[key_id] -= 1
            if not self._waiting[key_id]:
                del self._waiting[key_id]

    async def _renew(self, key_id: str, limits: tuple[int, int, int]) -> Refusal | None:
        renewal = self._renewals[key_id] = asyncio.get_running_loop().create_future()
        outcome: _Outcome = None  # when cancelled: the waiters try again
        try:
            outcome = await self._call_admit_script(key_id, limits)
            return outcome
        except Unavailable as exc:
            outcome = exc
            raise
        finally:
            del self._renewals[key_id]
            renewal.set_result(outcome)

    async def _call_admit_script(self, key_id: str, limits: tuple[int, int, int]) -> Refusal | None:
        now = self._clock()
        lease = self._leases.get(key_id)
        # What this replica owes goes with the call, taken out first so that no other call sends it too.
        unpaid = self._unpaid.pop(key_id, 0)
        returned, returned_window, wanted = 0, 0, 1
        if lease is not None:
            returned, returned_window, wanted = lease.unused, lease.window, lease.wanted_next(now)
            lease.unused = 0
        # Enough for the requests waiting for this call too, so that they need no call of their own.
        wanted = min(MAX_LEASE_REQUESTS, max(wanted, 1 + self._waiting.get(key_id, 0)))
        try:
            with unavailable_when_redis_fails("rate limiter"):
                running = self._running.get(key_id, 0)
                reply = await self._admit_script(
                    keys=[_prefix(key_id)],
                    args=[unpaid, returned, returned_window, *limits, wanted, running],
                )
        except BaseException:
            # Owed still, unless Redis added them before the call failed or was cancelled: counting tokens
            # twice refuses a little early, losing them would admit past the limit. Requests given back
            # are not taken back: a lease Redis no longer counts would admit past the limit.
            if unpaid:
                self.charge(key_id, unpaid)
            raise
        verdict = reply[0]
        if verdict == 1:
            return Refusal("requests", limits[0], int(reply[1]))
        if verdict == 2:
            return Refusal("tokens", limits[1], int(reply[1]), limits[2])
        granted, window_tokens, window, ms_left = (int(value) for value in reply[1:])
        self._leases[key_id] = _Lease(
            window, granted - 1, granted, window_tokens, now, now + min(LEASE_SECONDS, ms_left / 1000)
        )
        return None

    def charge(self, key_id: str, tokens: int) -> None:
        """Notes tokens a finished request used, for the key's next call to Redis or the next flush."""
        self._unpaid[key_id] = self._unpaid.get(key_id, 0) + tokens

    def take_owed(self) -> Owed:
        """What this replica owes Redis, taken out: every key's unpaid tokens, and the unused requests of
        the leases that have ended (forgotten here). Empty when nothing is owed."""
        now = self._clock()
        owed: Owed = {key_id: [tokens, 0, 0] for key_id, tokens in self._unpaid.items()}
        self._unpaid = {}
        for key_id, (tokens, _, _) in owed.items():
            if key_id in self._leases:
                self._leases[key_id].window_tokens += tokens  # still counted in the lease's check
        for key_id in [key_id for key_id, lease in self._leases.items() if now >= lease.ends_at]:
            lease = self._leases.pop(key_id)
            if lease.unused:
                owed.setdefault(key_id, [0, 0, 0])[1:] = [lease.unused, lease.window]
        return owed

    async def settle(self, owed: Owed) -> None:
        """Pays what `take_owed` took, in one round trip (dropped if Redis fails, as limits fail open)."""
        calls = [([_prefix(key_id)], args) for key_id, args in owed.items()]
        with unavailable_when_redis_fails("rate limiter"):
            await run_script_calls(self._client, self._flush, calls)
