"""The Gateway's outcome reporter against a real gRPC server in this process: batched, bounded, and
nothing dropped without being counted."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from sophia.router.v1 import router_pb2 as pb
from sophia.router.v1 import router_pb2_grpc

from libs import deadline, tls
from libs.breaker import DependencyBreaker
from libs.clients import open_channel
from libs.config import ClientSettings
from services.gateway.domain import Target
from services.gateway.serving.fallback import Attempt
from services.gateway.serving.router_client import OutcomeReporter, attempt_report


class _Recording(router_pb2_grpc.RouterServiceServicer):
    def __init__(self) -> None:
        self.batches: list[list[pb.OutcomeReport]] = []

    async def ReportOutcome(self, request, context):
        self.batches.append(list(request.reports))
        return pb.ReportOutcomeResponse(recorded=len(request.reports))


async def _server(servicer) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _never() -> None:
    raise ConnectionError("down")


def _reporter(channel, breaker: DependencyBreaker | None = None, **settings) -> OutcomeReporter:
    breaker = breaker or DependencyBreaker("router", _never)
    return OutcomeReporter(router_pb2_grpc.RouterServiceStub(channel), breaker, **settings)


def _entry(n: int) -> pb.OutcomeReport:
    return pb.OutcomeReport(provider="p", model_id=f"m{n}", outcome=pb.OUTCOME_SUCCESS, latency_ms=n)


async def _until(condition) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the reporter flushes on its own timer
            await asyncio.sleep(0.005)


def test_many_reports_travel_in_few_rpcs_and_all_arrive():
    async def scenario():
        recording = _Recording()
        server, port = await _server(recording)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reporter = OutcomeReporter(
                router_pb2_grpc.RouterServiceStub(channel),
                DependencyBreaker("router", _never),
                batch_size=256,
            )
            for n in range(600):
                reporter.add(_entry(n))
            await _until(lambda: reporter.sent == 600)
            await reporter.aclose()
        await server.stop(0)
        return recording.batches, reporter

    batches, reporter = asyncio.run(scenario())
    assert sum(len(b) for b in batches) == 600 and reporter.dropped == 0
    assert 3 <= len(batches) <= 4 and max(len(b) for b in batches) == 256
    assert [r.model_id for b in batches for r in b] == [f"m{n}" for n in range(600)]


class _Slow(_Recording):
    """A Router that takes 20 ms to answer, as one does under load."""

    async def ReportOutcome(self, request, context):
        await asyncio.sleep(0.02)
        return await super().ReportOutcome(request, context)


def test_under_steady_load_one_batch_goes_per_interval():
    """Reports arriving every 2 ms for 0.6 s, 50 ms between flushes: about a dozen RPCs. Sending again as
    soon as a flush returned would make one RPC per 20 ms answer (30), each as small as what arrived
    during it."""

    async def scenario():
        recording = _Slow()
        server, port = await _server(recording)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reporter = _reporter(channel, flush_seconds=0.05)
            for n in range(300):
                reporter.add(_entry(n))
                await asyncio.sleep(0.002)
            await _until(lambda: reporter.sent == 300)
            await reporter.aclose()
        await server.stop(0)
        return recording.batches

    batches = asyncio.run(scenario())
    assert [r.model_id for b in batches for r in b] == [f"m{n}" for n in range(300)]
    assert len(batches) <= 16, [len(b) for b in batches]


def test_reports_the_router_cannot_take_are_counted_and_logged_once(caplog):
    async def scenario():
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            breaker = DependencyBreaker("router", _never, probe_interval_seconds=60)
            reporter = OutcomeReporter(
                router_pb2_grpc.RouterServiceStub(channel), breaker, timeout_seconds=0.5
            )
            for n in range(5):
                reporter.add(_entry(n))
            await _until(lambda: reporter.dropped == 5)
            for n in range(3):  # still unreachable: dropped again, no second warning
                reporter.add(_entry(n))
            await _until(lambda: reporter.dropped == 8)
            await reporter.aclose()
            await breaker.aclose()
        return reporter

    with caplog.at_level(logging.WARNING, logger="services.gateway.serving.router_client"):
        reporter = asyncio.run(scenario())
    assert (reporter.sent, reporter.dropped) == (0, 8)
    warnings = [r for r in caplog.records if "not delivered to the router" in r.getMessage()]
    assert len(warnings) == 1


def test_a_full_queue_drops_and_counts_the_excess():
    async def scenario():
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            reporter = OutcomeReporter(
                router_pb2_grpc.RouterServiceStub(channel),
                DependencyBreaker("router", _never),
                max_pending=10,
            )
            for n in range(15):
                reporter.add(_entry(n))
            dropped_at_once = reporter.dropped
            await reporter.aclose()
            return dropped_at_once

    assert asyncio.run(scenario()) == 5


@pytest.mark.parametrize(
    ("outcome", "retryable", "expected"),
    [
        ("success", True, pb.OUTCOME_SUCCESS),
        ("timeout", True, pb.OUTCOME_TIMEOUT),
        ("http_503", True, pb.OUTCOME_RETRYABLE_ERROR),
        ("http_400", False, pb.OUTCOME_FATAL_ERROR),
        # The caller's own deadline: no verdict on the target (the Router counts it as not a failure).
        ("deadline", False, pb.OUTCOME_FATAL_ERROR),
    ],
)
def test_attempts_become_reports_with_their_times(outcome, retryable, expected):
    attempt = Attempt(Target("gpt", "openai", "gpt-x"), outcome, 120, retryable, 0.0, 40)
    report = attempt_report(attempt)
    assert (report.outcome, report.latency_ms, report.time_to_first_token_ms) == (expected, 120, 40)
    assert report.error == ("" if outcome == "success" else outcome)


def test_reports_outlive_the_deadline_of_the_request_that_started_the_reporter():
    """The reporter's task is made during a request; through the mesh's client interceptor (which takes
    each call's timeout from the caller's deadline) it must not inherit that request's deadline."""

    async def scenario():
        recording = _Recording()
        server, port = await _server(recording)
        adopted = tls._own_credentials, tls._own_identity_adopted
        tls.adopt(None)  # a plaintext development mesh: this process presents no certificate
        try:
            channel = open_channel(
                f"127.0.0.1:{port}", service="sophia.router.v1.RouterService", settings=ClientSettings()
            )
        finally:
            tls._own_credentials, tls._own_identity_adopted = adopted
        reporter = _reporter(channel)
        token = deadline.start(0.05)  # the first request's: 50 ms to go
        try:
            reporter.add(_entry(1))
        finally:
            deadline.reset(token)
        await _until(lambda: sum(map(len, recording.batches)) == 1)
        await asyncio.sleep(0.1)  # that request's deadline is long gone
        reporter.add(_entry(2))
        await _until(lambda: sum(map(len, recording.batches)) == 2)
        assert reporter.dropped == 0
        await reporter.aclose()
        await channel.close()
        await server.stop(None)

    asyncio.run(scenario())
