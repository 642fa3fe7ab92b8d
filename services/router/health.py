"""Live health per (provider, model) target, shared by every Router replica through Redis.

Each target has, in Redis:
- `router:health:events:<target>`: its latest outcomes (a capped list of "ms,outcome,latency,ttft"),
  the window that error rates and latency percentiles are computed over;
- `router:health:state:<target>`: its circuit breaker (state, since, consecutive failures, probes
  left, last error).

Every change is one Lua script, so replicas never race: an outcome is appended and the breaker moved
in the same step (closed → open after N consecutive failures or an error rate above X % over the
window with at least M requests; a failed probe re-opens it; enough successful probes close it), and a
probe is claimed atomically (open → half-open once the cool-down is over, then at most `probes`
requests let through). Times are Redis's own clock (TIME), so replicas' clocks may differ.

A probe is a loan: the Router hands it out when it plans, before anyone knows whether the request will
test the provider at all. An outcome that is no verdict on the target (REJECTED: the request refused as
bad, too long for the model, or cancelled) gives the probe back, and a probe whose outcome never comes
(the target was not tried, the report was lost) is given back once its lease ends; otherwise a recovered
provider would stay out of rotation for another whole cool-down.

Routing reads a local snapshot of the breakers that each replica refreshes every `refresh_seconds`
and right after recording, so a Route costs no Redis round trip; only a target whose cool-down is
over costs one (to claim its probe). When Redis is unreachable the last snapshot stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from libs.config import BreakerConfig
from libs.errors import ResourceExhausted, Unavailable
from libs.redis_store import run_script_calls

log = logging.getLogger(__name__)

PREFIX = "router:health:"
TARGETS_KEY = PREFIX + "targets"
# Outcomes kept per target: the window is the last `window_seconds` of these.
MAX_EVENTS = 500
# A ceiling on distinct targets, so a caller inventing names cannot grow Redis without bound.
MAX_TRACKED_TARGETS = 4096
SEPARATOR = "\x1f"


class Outcome(Enum):
    SUCCESS = "s"
    FAILURE = "f"
    # The request itself was refused (a 400): not held against the target.
    REJECTED = "x"


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


Target = tuple[str, str]  # (provider, model_id)

_RECORD = """
local member = ARGV[1]
if redis.call('SISMEMBER', KEYS[3], member) == 0 then
  if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[8]) then return 'full' end
  redis.call('SADD', KEYS[3], member)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, min_requests, error_rate = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local consecutive_failures, probes, max_events = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

local function trip()
  redis.call('HSET', KEYS[1], 'state', 'open', 'since', now, 'probes', 0, 'probe_successes', 0, 'out', 0)
  return 'open'
end

local function failure_rate_trips()
  local from = math.max(now - window, tonumber(redis.call('HGET', KEYS[1], 'closed_at') or '0'))
  local total, failures = 0, 0
  for _, event in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    local at, o = string.match(event, '^(%d+),(%a)')
    if tonumber(at) >= from and o ~= 'x' then
      total = total + 1
      if o == 'f' then failures = failures + 1 end
    end
  end
  return total >= min_requests and failures / total > error_rate
end

-- One outcome: appended to the window, the breaker moved; returns the state after it.
local function apply(outcome, latency, ttft, message)
  redis.call('LPUSH', KEYS[2], now .. ',' .. outcome .. ',' .. latency .. ',' .. ttft)
  redis.call('LTRIM', KEYS[2], 0, max_events - 1)
  local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
  local out = tonumber(redis.call('HGET', KEYS[1], 'out') or '0')
  if outcome == 'x' then
    -- No verdict on the target: a probe it answered is handed back for the next request to use.
    if state == 'half_open' and out > 0 then
      redis.call('HSET', KEYS[1], 'out', out - 1)
      redis.call('HINCRBY', KEYS[1], 'probes', 1)
    end
    return state
  end
  if outcome == 's' then
    redis.call('HSET', KEYS[1], 'consecutive', 0)
    if state == 'half_open' then
      redis.call('HSET', KEYS[1], 'out', math.max(out - 1, 0))
      if redis.call('HINCRBY', KEYS[1], 'probe_successes', 1) >= probes then
        redis.call('HSET', KEYS[1], 'state', 'closed', 'since', now, 'closed_at', now, 'out', 0)
        return 'closed'
      end
    end
    return state
  end
  redis.call('HSET', KEYS[1], 'last_error', message, 'last_error_at', now)
  local consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
  if state == 'half_open' then return trip() end
  if state ~= 'closed' then return state end
  if consecutive >= consecutive_failures or failure_rate_trips() then return trip() end
  return state
end

local states = {}
for i = 9, #ARGV, 4 do
  states[#states + 1] = apply(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
return states
"""

_CLAIM_PROBE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then return 1 end
local since = tonumber(redis.call('HGET', KEYS[1], 'since') or '0')
local cooldown, lease = tonumber(ARGV[1]), tonumber(ARGV[3])
if state == 'open' then
  if now - since < cooldown then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'since', now, 'probes', tonumber(ARGV[2]) - 1,
             'probe_successes', 0, 'out', 1, 'lease_until', now + lease)
  return 1
end
if tonumber(redis.call('HGET', KEYS[1], 'probes') or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], 'probes', -1)
  redis.call('HINCRBY', KEYS[1], 'out', 1)
  redis.call('HSET', KEYS[1], 'lease_until', now + lease)
  return 1
end
-- Probes out past their lease with no verdict (not tried, or their reports were lost): new ones go
-- through. A state written before leases existed has none: its probes expire a cool-down after it.
local lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or (since + cooldown))
if now >= lease_until then
  redis.call('HSET', KEYS[1], 'probes', tonumber(ARGV[2]) - 1, 'out', 1, 'lease_until', now + lease)
  return 1
end
return 0
"""


def _member(target: Target) -> str:
    return f"{target[0]}{SEPARATOR}{target[1]}"


def _state_key(member: str) -> str:
    return f"{PREFIX}state:{member}"


def _events_key(member: str) -> str:
    return f"{PREFIX}events:{member}"


@dataclass(frozen=True)
class OutcomeReport:
    provider: str
    model_id: str
    outcome: Outcome
    latency_ms: int
    time_to_first_token_ms: int = 0
    error: str = ""

    @property
    def target(self) -> Target:
        return (self.provider, self.model_id)


@dataclass(frozen=True)
class BreakerView:
    """One target's breaker as this replica last saw it."""

    state: CircuitState = CircuitState.CLOSED
    # Local monotonic time at which an open breaker's cool-down ends.
    cooldown_ends: float = 0.0
    # Median latency of recent successes, 0 when unknown.
    p50_latency_ms: int = 0


@dataclass(frozen=True)
class TargetHealth:
    provider: str
    model_id: str
    successes: int
    failures: int
    error_rate: float
    p50_latency_ms: int
    p95_latency_ms: int
    p50_time_to_first_token_ms: int
    last_error: str
    last_error_at_ms: int
    state: CircuitState
    state_since_ms: int
    consecutive_failures: int


def _percentile(values: Sequence[int], share: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def _parse_events(raw: Iterable[str], since_ms: int) -> tuple[int, int, list[int], list[int]]:
    successes = failures = 0
    latencies, ttfts = [], []
    for event in raw:
        at, outcome, latency, ttft = event.split(",")
        if int(at) < since_ms or outcome == Outcome.REJECTED.value:
            continue
        if outcome == Outcome.SUCCESS.value:
            successes += 1
            latencies.append(int(latency))
            if int(ttft):
                ttfts.append(int(ttft))
        else:
            failures += 1
    return successes, failures, latencies, ttfts


class HealthBook:
    """Records outcomes and keeps this replica's view of every breaker."""

    def __init__(self, redis: Redis, settings: BreakerConfig) -> None:
        self._redis = redis
        self.settings = settings
        self._record = redis.register_script(_RECORD)
        self._claim = redis.register_script(_CLAIM_PROBE)
        self._views: dict[Target, BreakerView] = {}
        # Redis time minus local time, in ms, as of the last refresh.
        self._clock_offset_ms = 0.0
        self._store_down = False
        # Every target of the current config (enabled or not), and whether the tracked ones are still to
        # be pruned to it: done by the next refresh, retried there while Redis cannot be reached.
        self._configured: frozenset[Target] | None = None
        self._prune_due = False

    @property
    def store_reachable(self) -> bool:
        return not self._store_down

    def configure(self, targets: Iterable[Target]) -> None:
        """The targets of a config just applied: the others tracked are forgotten at the next refresh."""
        self._configured = frozenset(targets)
        self._prune_due = True

    def view(self, target: Target) -> BreakerView:
        return self._views.get(target, BreakerView())

    def views(self) -> dict[Target, BreakerView]:
        return dict(self._views)

    async def record(self, reports: Sequence[OutcomeReport]) -> int:
        """Records every report, in order (one pipeline, one script call per target); returns how many
        were recorded."""
        if not reports:
            return 0
        s = self.settings
        # A batch holds many reports of few targets: one call per target carries all of its outcomes,
        # which costs a fraction of a call per report here and in Redis.
        by_target: dict[Target, list[OutcomeReport]] = {}
        for report in reports:
            by_target.setdefault(report.target, []).append(report)
        calls = []
        for target, outcomes in by_target.items():
            member = _member(target)
            args = [
                member,
                int(s.window_seconds * 1000),
                s.min_requests,
                s.error_rate,
                s.consecutive_failures,
                s.probes,
                MAX_EVENTS,
                MAX_TRACKED_TARGETS,
            ]
            for report in outcomes:
                error = report.error[:120].replace(",", ";")
                args += (report.outcome.value, report.latency_ms, report.time_to_first_token_ms, error)
            calls.append(([_state_key(member), _events_key(member), TARGETS_KEY], args))
        try:
            results = await run_script_calls(self._redis, self._record, calls)
        except redis_errors.RedisError as exc:
            self._lost(exc)
            raise Unavailable("health store unavailable: outcomes not recorded") from exc
        self._store_down = False
        refused = 0
        for (target, outcomes), states in zip(by_target.items(), results, strict=True):
            if states == "full":
                refused += len(outcomes)
                continue
            for state in states:
                self._note(target, CircuitState(state))
        if refused:
            raise ResourceExhausted(
                f"already tracking {MAX_TRACKED_TARGETS} targets; {refused} reports refused"
            )
        return len(reports)

    def _note(self, target: Target, state: CircuitState) -> None:
        """Applies a state this replica just caused, before the next refresh brings it anyway."""
        previous = self._views.get(target, BreakerView())
        if state is previous.state:
            return
        cooldown_ends = (
            time.monotonic() + self.settings.cooldown_seconds if state is CircuitState.OPEN else 0.0
        )
        self._views[target] = BreakerView(state, cooldown_ends, previous.p50_latency_ms)
        log.warning("circuit of %s/%s is now %s", target[0], target[1], state.value)

    async def claim_probe(self, target: Target, lease_seconds: float | None = None) -> bool:
        """Whether this request may try a target whose breaker is not closed (atomic across replicas).

        A probe granted is on loan for `lease_seconds` (at most a cool-down, the default): with no outcome
        by then it is presumed lost and another request may probe."""
        cooldown = self.settings.cooldown_seconds
        lease = cooldown if lease_seconds is None else min(max(lease_seconds, 0.0), cooldown)
        try:
            granted = await self._claim(
                keys=[_state_key(_member(target))],
                args=[int(cooldown * 1000), self.settings.probes, int(lease * 1000)],
            )
        except redis_errors.RedisError as exc:
            self._lost(exc)
            return False
        if granted:
            self._views[target] = BreakerView(CircuitState.HALF_OPEN, 0.0, self.view(target).p50_latency_ms)
        return bool(granted)

    async def prune(self, configured: Iterable[Target]) -> int:
        """Forgets every tracked target that is not in `configured` (its events and breaker too), so
        targets dropped from the config neither fill the MAX_TRACKED_TARGETS set nor linger in health
        reports; returns how many were forgotten. Raises Unavailable when Redis cannot be reached."""
        keep = {_member(target) for target in configured}
        try:
            stale = sorted(set(await self._redis.smembers(TARGETS_KEY)) - keep)
            if stale:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for member in stale:
                        pipe.srem(TARGETS_KEY, member)
                        pipe.delete(_state_key(member), _events_key(member))
                    await pipe.execute()
        except redis_errors.RedisError as exc:
            self._lost(exc)
            raise Unavailable("health store unavailable: targets not pruned") from exc
        for member in stale:
            self._views.pop(tuple(member.split(SEPARATOR, 1)), None)
        if stale:
            log.info("forgot the health of %d targets no longer configured", len(stale))
        return len(stale)

    async def refresh(self, targets: Iterable[Target]) -> None:
        """Reads the shared breakers of `targets` (and their recent latency) into this replica's view;
        first forgets the targets a config change dropped, if that is still to be done."""
        targets = list(targets)
        configured = self._configured
        if self._prune_due and configured is not None:
            try:
                await self.prune(configured)
            except Unavailable:
                return  # logged once by _lost; pruned (and refreshed) once Redis answers
            # A reload during the prune configured other targets: those are pruned at the next refresh.
            self._prune_due = self._configured is not configured
        s = self.settings
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.time()
                for target in targets:
                    member = _member(target)
                    pipe.hmget(_state_key(member), "state", "since")
                    pipe.lrange(_events_key(member), 0, 99)
                started = time.monotonic()
                replies = await pipe.execute()
        except redis_errors.RedisError as exc:
            self._lost(exc)
            return
        if self._store_down:
            log.info("health store reachable again")
        self._store_down = False
        seconds, micros = replies[0]
        redis_now_ms = seconds * 1000 + micros // 1000
        self._clock_offset_ms = redis_now_ms - started * 1000
        views = {}
        for index, target in enumerate(targets):
            (state, since), events = replies[1 + 2 * index], replies[2 + 2 * index]
            state = CircuitState(state or CircuitState.CLOSED)
            cooldown_ends = 0.0
            if state is CircuitState.OPEN:
                cooldown_ends = (int(since) + s.cooldown_seconds * 1000 - self._clock_offset_ms) / 1000
            _, _, latencies, _ = _parse_events(events, redis_now_ms - int(s.window_seconds * 1000))
            views[target] = BreakerView(state, cooldown_ends, _percentile(latencies, 0.5))
        for target, view in views.items():
            if self._views.get(target, BreakerView()).state is not view.state:
                log.info("circuit of %s/%s is %s (shared)", target[0], target[1], view.state.value)
        self._views = views

    def _lost(self, exc: Exception) -> None:
        if not self._store_down:
            log.warning("health store unreachable, routing on the last known breaker states: %s", exc)
        self._store_down = True

    def _last_known(self, configured: Iterable[Target]) -> list[TargetHealth]:
        """Without the store: the breaker states this replica saw last, no statistics."""
        healths = []
        for provider, model_id in sorted(set(configured) | set(self._views)):
            view = self.view((provider, model_id))
            healths.append(TargetHealth(provider, model_id, 0, 0, 0.0, 0, 0, 0, "", 0, view.state, 0, 0))
        return healths

    async def report(self, configured: Iterable[Target]) -> list[TargetHealth]:
        """Every configured target and every other reported one, over the window; when the store is
        unreachable, the last known breaker states (and `store_reachable` turns False: degraded)."""
        s = self.settings
        try:
            members = await self._redis.smembers(TARGETS_KEY)
            targets = sorted(set(configured) | {tuple(m.split(SEPARATOR, 1)) for m in members})
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.time()
                for target in targets:
                    member = _member(target)
                    pipe.hgetall(_state_key(member))
                    pipe.lrange(_events_key(member), 0, -1)
                replies = await pipe.execute()
        except redis_errors.RedisError as exc:
            self._lost(exc)
            return self._last_known(configured)
        seconds, micros = replies[0]
        window_start = seconds * 1000 + micros // 1000 - int(s.window_seconds * 1000)
        healths = []
        for index, (provider, model_id) in enumerate(targets):
            state, events = replies[1 + 2 * index], replies[2 + 2 * index]
            successes, failures, latencies, ttfts = _parse_events(events, window_start)
            total = successes + failures
            healths.append(
                TargetHealth(
                    provider=provider,
                    model_id=model_id,
                    successes=successes,
                    failures=failures,
                    error_rate=failures / total if total else 0.0,
                    p50_latency_ms=_percentile(latencies, 0.5),
                    p95_latency_ms=_percentile(latencies, 0.95),
                    p50_time_to_first_token_ms=_percentile(ttfts, 0.5),
                    last_error=state.get("last_error", ""),
                    last_error_at_ms=int(state.get("last_error_at", 0)),
                    state=CircuitState(state.get("state", CircuitState.CLOSED)),
                    state_since_ms=int(state.get("since", 0)),
                    consecutive_failures=int(state.get("consecutive", 0)),
                )
            )
        return healths


async def refresh_forever(book: HealthBook, targets) -> None:
    """Keeps the view fresh; `targets` is called each time (reloads change the configured targets)."""
    while True:
        try:
            await book.refresh(targets())
        except Exception:  # a bug here must not stop the refreshes for good
            log.exception("breaker refresh failed")
        await asyncio.sleep(book.settings.refresh_seconds)
