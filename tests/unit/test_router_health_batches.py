"""HealthBook.record against a real Redis: a batch costs one script call per target, not per report,
and the breaker still moves report by report, in order."""

from __future__ import annotations

from libs.config import BreakerConfig
from services.router.health import CircuitState, HealthBook, Outcome, OutcomeReport


async def _script_calls(client) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def _report(model_id: str, outcome: Outcome) -> OutcomeReport:
    return OutcomeReport("p", model_id, outcome, latency_ms=12)


async def test_a_batch_makes_one_script_call_per_target(redis_client):
    book = HealthBook(redis_client, BreakerConfig())
    await book.record([_report("warm-up", Outcome.SUCCESS)])  # loads the script
    before = await _script_calls(redis_client)
    reports = [_report(f"m{n % 2}", Outcome.SUCCESS) for n in range(20)]
    assert await book.record(reports) == 20
    assert await _script_calls(redis_client) - before == 2
    for model_id in ("m0", "m1"):
        events = await redis_client.lrange(f"router:health:events:p\x1f{model_id}", 0, -1)
        assert len(events) == 10 and all(",s,12," in event for event in events)


async def test_the_breaker_moves_at_the_report_that_moves_it_within_a_batch(redis_client):
    """Five failures in a row open the breaker at the fifth; the success before them resets the count,
    the success after them finds it open (not closing it without a probe)."""
    book = HealthBook(redis_client, BreakerConfig(consecutive_failures=5, min_requests=100))
    outcomes = [Outcome.FAILURE] * 4 + [Outcome.SUCCESS] + [Outcome.FAILURE] * 5 + [Outcome.SUCCESS]
    await book.record([_report("m", outcome) for outcome in outcomes])
    assert book.view(("p", "m")).state is CircuitState.OPEN
    state = await redis_client.hgetall("router:health:state:p\x1fm")
    assert state["state"] == "open" and state["consecutive"] == "0"
    assert await redis_client.llen("router:health:events:p\x1fm") == len(outcomes)


async def test_four_failures_a_success_and_four_failures_leave_it_closed(redis_client):
    book = HealthBook(redis_client, BreakerConfig(consecutive_failures=5, min_requests=100))
    outcomes = [Outcome.FAILURE] * 4 + [Outcome.SUCCESS] + [Outcome.FAILURE] * 4
    await book.record([_report("m", outcome) for outcome in outcomes])
    state = await redis_client.hgetall("router:health:state:p\x1fm")
    assert state.get("state", "closed") == "closed" and state["consecutive"] == "4"
