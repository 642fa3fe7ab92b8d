"""The dependency breaker: opened by failures, closed only by its probe, one log line per transition."""

from __future__ import annotations

import asyncio
import logging

from libs import deadline
from libs.breaker import BreakerState, DependencyBreaker


class FlakyDependency:
    def __init__(self) -> None:
        self.up = False
        self.probes = 0

    async def probe(self) -> None:
        self.probes += 1
        if not self.up:
            raise ConnectionError("connection refused")


async def _until(predicate, within: float = 5.0) -> None:
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {within}s")


async def test_a_failure_opens_and_the_probe_closes_once_the_dependency_answers(caplog):
    dependency = FlakyDependency()
    breaker = DependencyBreaker("cache", dependency.probe, probe_interval_seconds=0.01)
    assert breaker.allows() and breaker.state is BreakerState.CLOSED
    with caplog.at_level(logging.DEBUG, logger="libs.breaker"):
        for _ in range(50):
            breaker.record_failure("UNAVAILABLE")
        assert not breaker.allows()
        await _until(lambda: dependency.probes >= 3)
        assert breaker.state is BreakerState.OPEN
        dependency.up = True
        await _until(breaker.allows)
        breaker.record_success()  # a real call worked: the outage is over
        breaker.record_success()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "cache unavailable (UNAVAILABLE)" in warnings[0].getMessage()
    assert len(infos) == 1 and "cache available again" in infos[0].getMessage()
    await breaker.aclose()


async def test_the_probe_does_not_inherit_the_failed_requests_deadline():
    seen: list[float | None] = []

    async def probe() -> None:
        seen.append(deadline.remaining())

    breaker = DependencyBreaker("router", probe, probe_interval_seconds=0.01)
    token = deadline.start(0.001)
    try:
        breaker.record_failure("DEADLINE_EXCEEDED")
    finally:
        deadline.reset(token)
    await _until(breaker.allows)
    assert seen == [None]


async def test_a_hanging_probe_times_out_and_is_retried():
    calls = 0

    async def probe() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            await asyncio.sleep(60)

    breaker = DependencyBreaker("redis", probe, probe_interval_seconds=0.01, probe_timeout_seconds=0.05)
    breaker.record_failure("TimeoutError")
    await _until(breaker.allows)
    assert calls == 3


async def test_aclose_stops_the_probe():
    dependency = FlakyDependency()
    breaker = DependencyBreaker("ledger", dependency.probe, probe_interval_seconds=0.01)
    breaker.record_failure("UNAVAILABLE")
    await _until(lambda: dependency.probes >= 1)
    await breaker.aclose()
    probes = dependency.probes
    await asyncio.sleep(0.05)
    assert dependency.probes == probes
    assert breaker.state is BreakerState.OPEN


async def test_a_dependency_that_fails_right_after_its_probe_succeeded_is_still_one_outage(caplog):
    dependency = FlakyDependency()
    dependency.up = True  # answers its health probe, yet real calls fail (its own backend is down)
    breaker = DependencyBreaker("cache", dependency.probe, probe_interval_seconds=0.01, settle_seconds=0.2)
    with caplog.at_level(logging.INFO, logger="libs.breaker"):
        for _ in range(5):
            breaker.record_failure("UNAVAILABLE")
            await _until(breaker.allows)
        assert not [r for r in caplog.records if r.levelno == logging.INFO]
        await asyncio.sleep(0.25)
        assert breaker.allows()  # closed for the settle time with no failure: recovered
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.INFO]
    breaker.record_failure("UNAVAILABLE")  # a new outage is logged again
    assert [r.levelno for r in caplog.records][-1] == logging.WARNING
    await breaker.aclose()


async def test_a_threshold_opens_only_after_that_many_failures_in_a_row():
    dependency = FlakyDependency()
    breaker = DependencyBreaker("redis", dependency.probe, failure_threshold=3)
    breaker.record_failure("timeout")
    breaker.record_failure("timeout")
    breaker.record_success()  # the run is broken
    breaker.record_failure("timeout")
    breaker.record_failure("timeout")
    assert breaker.allows()
    breaker.record_failure("timeout")
    assert not breaker.allows()
    await breaker.aclose()
