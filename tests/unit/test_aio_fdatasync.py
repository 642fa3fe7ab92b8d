"""fdatasync through Linux AIO: submitted without blocking, resolved by the event loop."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from services.gateway.usage.aio_fdatasync import AioFdatasync

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="Linux AIO"), pytest.mark.timeout(10)]


@pytest.fixture
async def aio():
    opened = AioFdatasync.open(asyncio.get_running_loop())
    if opened is None:
        pytest.skip("no Linux AIO here (io_setup refused)")
    return opened


@pytest.fixture
def segment(tmp_path):
    fd = os.open(tmp_path / "segment", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


async def test_syncs_resolve_on_the_loop_each_once(aio, segment):
    syncs = []
    for i in range(100):  # more than one reap's worth of events
        os.pwrite(segment, b"line\n", i * 5)
        syncs.append(aio.sync(segment))
    assert aio.in_flight() == 100
    assert await asyncio.gather(*syncs) == [None] * 100
    assert aio.in_flight() == 0
    aio.close()


async def test_a_submission_the_kernel_refuses_raises_at_once(aio, tmp_path):
    fd = os.open(tmp_path / "gone", os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(OSError):
        aio.sync(fd)  # EBADF
    assert aio.in_flight() == 0
    aio.close()


@pytest.mark.parametrize("in_flight", [3, 64, 100])  # one reap's worth of events, and more
async def test_closing_waits_for_the_syncs_in_flight(aio, segment, in_flight):
    os.pwrite(segment, b"line\n", 0)
    syncs = [aio.sync(segment) for _ in range(in_flight)]
    aio.close()
    assert all(sync.done() and sync.exception() is None for sync in syncs)


async def test_a_cancelled_wait_leaves_the_others(aio, segment):
    first, second = aio.sync(segment), aio.sync(segment)
    first.cancel()
    assert await second is None
    await asyncio.sleep(0.05)
    assert aio.in_flight() == 0
    aio.close()
