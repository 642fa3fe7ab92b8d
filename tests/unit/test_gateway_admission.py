"""Admission control: replica limit, tenant share, refusals with retry hints, release however it ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from libs.errors import ResourceExhausted, Unavailable
from services.gateway.access.admission import Admission, _observe_inflight, retry_trailers


def admission(max_inflight: int = 4, share: float = 0.5, retry_after_ms: int = 250) -> Admission:
    return Admission(max_inflight=max_inflight, max_tenant_share=share, retry_after_ms=retry_after_ms)


def test_a_full_replica_refuses_with_unavailable_and_retry_hints():
    gate = admission(max_inflight=2, share=1.0, retry_after_ms=1500)
    gate.admit("a")
    gate.admit("b")
    with pytest.raises(Unavailable) as refused:
        gate.admit("c")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert dict(refused.value.trailers) == {"retry-after-ms": "1500", "retry-after": "2"}
    assert gate.inflight == 2


def test_a_tenant_beyond_its_share_gets_resource_exhausted_while_others_are_admitted():
    gate = admission(max_inflight=4, share=0.5)
    assert gate.max_per_tenant == 2
    gate.admit("flooder")
    gate.admit("flooder")
    with pytest.raises(ResourceExhausted) as refused:
        gate.admit("flooder")
    assert "flooder" in refused.value.message
    assert "retry-after-ms" in dict(refused.value.trailers)
    gate.admit("quiet")
    gate.admit("other")
    assert gate.inflight == 4
    assert gate.inflight_of("flooder") == 2


def test_refusals_take_no_slot():
    gate = admission(max_inflight=2, share=0.5)
    gate.admit("a")
    for _ in range(10):
        with pytest.raises(ResourceExhausted):
            gate.admit("a")
    assert gate.inflight == 1
    assert gate.inflight_of("a") == 1


def test_every_tenant_gets_at_least_one_slot():
    assert admission(max_inflight=3, share=0.01).max_per_tenant == 1
    assert admission(max_inflight=3, share=0.5).max_per_tenant == 2  # rounded up
    assert admission(max_inflight=3, share=1.0).max_per_tenant == 3


def test_release_frees_the_slot_once_even_if_called_twice():
    gate = admission(max_inflight=1, share=1.0)
    slot = gate.admit("a")
    slot.release()
    slot.release()
    assert gate.inflight == 0
    assert gate.inflight_of("a") == 0
    gate.admit("b")
    with pytest.raises(Unavailable):
        gate.admit("a")


def test_a_request_that_fails_gives_its_slot_back():
    gate = admission(max_inflight=1, share=1.0)
    with pytest.raises(RuntimeError), gate.admit("a"):
        raise RuntimeError("the provider failed")
    assert gate.inflight == 0
    with gate.admit("a"):
        assert gate.inflight == 1


def test_a_cancelled_stream_gives_its_slot_back():
    gate = admission(max_inflight=1, share=1.0)

    async def stream():
        with gate.admit("a"):
            while True:
                yield "chunk"
                await asyncio.sleep(0)

    async def consume_then_cancel():
        async def consume():
            async for _ in stream():
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert gate.inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(consume_then_cancel())
    assert gate.inflight == 0


def test_after_a_flood_everything_is_admitted_again():
    gate = admission(max_inflight=4, share=0.5)
    held = [gate.admit("flooder"), gate.admit("flooder")]
    with pytest.raises(ResourceExhausted):
        gate.admit("flooder")
    for slot in held:
        slot.release()
    again = [gate.admit("flooder"), gate.admit("flooder"), gate.admit("other"), gate.admit("other")]
    assert gate.inflight == len(again)


def test_retry_after_is_whole_seconds_rounded_up_and_never_zero():
    assert dict(retry_trailers(1)) == {"retry-after-ms": "1", "retry-after": "1"}
    assert dict(retry_trailers(1000))["retry-after"] == "1"
    assert dict(retry_trailers(1001))["retry-after"] == "2"


@pytest.mark.parametrize("max_inflight, share", [(0, 0.5), (4, 0.0), (4, 1.5)])
def test_nonsensical_limits_are_refused(max_inflight, share):
    with pytest.raises(ValueError):
        admission(max_inflight=max_inflight, share=share)


def test_the_inflight_gauge_reads_the_slots_held_when_collected():
    def observed() -> float:
        (observation,) = _observe_inflight(None)
        return observation.value

    before = observed()
    gate = admission(max_inflight=4, share=1.0)
    first, _second = gate.admit("a"), gate.admit("b")
    assert observed() == before + 2
    first.release()
    assert observed() == before + 1
