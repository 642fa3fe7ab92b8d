"""Fail fast while a dependency is known to be down, and notice at once when it is back.

A `DependencyBreaker` guards one dependency (a gRPC service, Redis) of one process. Callers ask
`breaker.allows()` before calling it; while the breaker is OPEN they skip the call and degrade at once
(bypass the cache, route locally, fail a budget check open or closed) instead of paying connection
attempts and retries on every request. A call that fails because the dependency is unreachable
(UNAVAILABLE, a timeout, a refused connection; not a verdict such as NOT_FOUND) is reported with
`record_failure(reason)`, which opens the breaker (after `failure_threshold` failures in a row, for a
dependency where skipping has a price, e.g. rate limits that go unenforced).

Only a background probe closes it again: every `probe_interval_seconds` it runs `probe()` (a
grpc.health.v1 Check for gRPC services, see `grpc_health_probe`; a PING for Redis, see
`libs.redis_store.redis_ping_probe`) and closes the breaker on the first success, so the dependency is
used again within about one interval of coming back, with no request paying for the discovery.

The probe only says the dependency answers health checks; a service whose own backend is down (a
cache whose Redis is gone) may still fail real calls. So an outage ends, with its INFO line, only once
a real call succeeded (`record_success()`) or, for callers that do not report successes, once the
breaker stayed closed for `settle_seconds`. A failure before that re-opens the breaker as part of the
same outage, silently: one WARNING and one INFO per outage, however often it flaps. So `settle_seconds`
must be longer than the longest call its callers make: a call let through right after the probe may fail
only at its timeout.

Usage:

    breaker = DependencyBreaker("cache", grpc_health_probe(channel, "sophia.cache.v1.CacheService"))
    if not breaker.allows():
        return bypass()
    try:
        reply = await stub.Lookup(request)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in UNREACHABLE:
            breaker.record_failure(exc.code().name)
        return bypass()
    breaker.record_success()
    ...
    await breaker.aclose()   # on shutdown: stops the probe

A breaker belongs to the event loop it is first opened in (the probe is a task of that loop).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

PROBE_INTERVAL_SECONDS = 0.25
PROBE_TIMEOUT_SECONDS = 0.5
SETTLE_SECONDS = 2.0

# Statuses that mean "the dependency could not be reached or did not answer in time".
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

Probe = Callable[[], Awaitable[object]]


class BreakerState(enum.Enum):
    CLOSED = "closed"  # the dependency is used
    OPEN = "open"  # known down: callers skip it until the probe sees it answer again


class DependencyBreaker:
    def __init__(
        self,
        name: str,
        probe: Probe,
        *,
        probe_interval_seconds: float = PROBE_INTERVAL_SECONDS,
        probe_timeout_seconds: float = PROBE_TIMEOUT_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
        failure_threshold: int = 1,
    ) -> None:
        """`probe()` must raise (or time out) while the dependency is down; its return value is ignored."""
        self.name = name
        self._probe = probe
        self._interval = probe_interval_seconds
        self._timeout = probe_timeout_seconds
        self._settle = settle_seconds
        self._threshold = failure_threshold
        self._failures_in_a_row = 0
        self._state = BreakerState.CLOSED
        self._outage_since: float | None = None  # set from the first failure until a confirmed recovery
        self._closed_at = 0.0
        self._probing: asyncio.Task | None = None

    @property
    def state(self) -> BreakerState:
        return self._state

    def allows(self) -> bool:
        """True when the dependency may be called now."""
        if self._state is BreakerState.OPEN:
            return False
        if self._outage_since is not None and time.monotonic() - self._closed_at >= self._settle:
            self._recovered()
        return True

    def record_success(self) -> None:
        """A real call succeeded: ends the outage, if one was still unconfirmed."""
        self._failures_in_a_row = 0
        if self._outage_since is not None and self._state is BreakerState.CLOSED:
            self._recovered()

    def record_failure(self, reason: str) -> None:
        """The dependency could not be reached: open (logging once per outage) and start probing."""
        if self._state is BreakerState.OPEN:
            return
        self._failures_in_a_row += 1
        if self._failures_in_a_row < self._threshold:
            return
        self._failures_in_a_row = 0
        self._state = BreakerState.OPEN
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("%s unavailable (%s): skipping it until it answers again", self.name, reason)
        else:
            log.debug("%s failed again right after its probe succeeded (%s)", self.name, reason)
        # A fresh context: the probe must not inherit the failed request's deadline, id or trace.
        self._probing = asyncio.get_running_loop().create_task(
            self._probe_until_back(), context=contextvars.Context()
        )

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.wait_for(self._probe(), self._timeout)
            except Exception as exc:  # any failure of the probe means "still down"
                log.debug("%s still unavailable: %s", self.name, exc)
                continue
            self._state = BreakerState.CLOSED
            self._closed_at = time.monotonic()
            self._probing = None
            return

    def _recovered(self) -> None:
        log.info("%s available again after %.1fs", self.name, self._closed_at - self._outage_since)
        self._outage_since = None

    async def aclose(self) -> None:
        """Stops the probe (at shutdown)."""
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
            self._probing = None


def grpc_health_probe(channel: grpc.aio.Channel, service: str) -> Probe:
    """A probe that succeeds when `service` on `channel` answers grpc.health.v1 Check with SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)

    async def probe() -> None:
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=PROBE_TIMEOUT_SECONDS
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(
                f"{service} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            )

    return probe
