"""The half-open probe against a real Redis: it is a loan that an outcome with no verdict on the target
gives back, and that ends with its lease when no outcome comes; targets a config dropped are forgotten."""

from __future__ import annotations

import asyncio

from libs.config import BreakerConfig
from services.router.health import TARGETS_KEY, CircuitState, HealthBook, Outcome, OutcomeReport

TARGET = ("p", "m")


def _report(outcome: Outcome, model_id: str = "m") -> OutcomeReport:
    return OutcomeReport("p", model_id, outcome, latency_ms=5)


async def _half_open(redis_client, cooldown: float = 0.2) -> HealthBook:
    """A book whose target has just gone half-open, its one probe out."""
    book = HealthBook(
        redis_client, BreakerConfig(consecutive_failures=1, cooldown_seconds=cooldown, probes=1)
    )
    await book.record([_report(Outcome.FAILURE)])
    assert book.view(TARGET).state is CircuitState.OPEN
    await asyncio.sleep(cooldown + 0.05)
    assert await book.claim_probe(TARGET)
    assert not await book.claim_probe(TARGET)  # the one probe is out
    return book


async def test_a_rejected_probe_hands_the_probe_back_at_once(redis_client):
    book = await _half_open(redis_client, cooldown=30)  # a wait of a cool-down would fail the test
    await book.record([_report(Outcome.REJECTED)])
    state = await redis_client.hgetall("router:health:state:p\x1fm")
    assert state["state"] == "half_open"
    # The next request probes (once), and its success closes the breaker.
    assert await book.claim_probe(TARGET)
    assert not await book.claim_probe(TARGET)
    await book.record([_report(Outcome.SUCCESS)])
    assert (await redis_client.hget("router:health:state:p\x1fm", "state")) == "closed"


async def test_a_rejection_without_a_probe_out_hands_nothing_back(redis_client):
    book = await _half_open(redis_client, cooldown=30)
    await book.record([_report(Outcome.REJECTED), _report(Outcome.REJECTED)])
    assert await book.claim_probe(TARGET)
    assert not await book.claim_probe(TARGET)  # two rejections gave back one probe, not two


async def test_a_probe_with_no_outcome_expires_with_its_lease(redis_client):
    book = HealthBook(redis_client, BreakerConfig(consecutive_failures=1, cooldown_seconds=0.3, probes=1))
    await book.record([_report(Outcome.FAILURE)])
    await asyncio.sleep(0.35)
    assert await book.claim_probe(TARGET, lease_seconds=0.1)
    assert not await book.claim_probe(TARGET, lease_seconds=0.1)
    await asyncio.sleep(0.15)  # the lease is over, the cool-down (0.3 s from the claim) is not
    assert await book.claim_probe(TARGET, lease_seconds=0.1)
    assert not await book.claim_probe(TARGET, lease_seconds=0.1)


async def test_a_failed_probe_still_opens_the_breaker_and_spends_the_probe(redis_client):
    book = await _half_open(redis_client, cooldown=30)
    await book.record([_report(Outcome.FAILURE)])
    assert book.view(TARGET).state is CircuitState.OPEN
    assert not await book.claim_probe(TARGET)


async def test_targets_no_longer_configured_are_forgotten_at_the_next_refresh(redis_client):
    book = HealthBook(redis_client, BreakerConfig())
    await book.record([_report(Outcome.FAILURE, "kept"), _report(Outcome.FAILURE, "dropped")])
    book.configure([("p", "kept")])
    await book.refresh([("p", "kept")])
    assert await redis_client.smembers(TARGETS_KEY) == {"p\x1fkept"}
    assert not await redis_client.exists(
        "router:health:state:p\x1fdropped", "router:health:events:p\x1fdropped"
    )
    assert await redis_client.llen("router:health:events:p\x1fkept") == 1
    assert [h.model_id for h in await book.report([("p", "kept")])] == ["kept"]
