"""The Gateway's budget checks against a real gRPC LedgerService in this process: asked at most about once
a second per tenant, one call shared by the requests in flight, refusals and outages as configured."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sophia.ledger.v1 import ledger_pb2 as pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.breaker import DependencyBreaker
from libs.errors import ResourceExhausted, Unavailable
from services.gateway.access.budgets import BudgetChecks
from tests.support import free_port


class _Ledger(ledger_pb2_grpc.LedgerServiceServicer):
    """Answers after 20 ms (as a busy ledger does), counting the calls; `spent` of a 1,000,000 limit."""

    def __init__(self, spent: int = 250_000) -> None:
        self.calls = 0
        self.spent = spent

    async def CheckBudget(self, request, context):
        self.calls += 1
        await asyncio.sleep(0.02)
        limit = 1_000_000
        return pb.CheckBudgetResponse(allowed=self.spent < limit, spent_micros=self.spent, limit_micros=limit)


async def _never() -> None:
    raise ConnectionError("down")


async def _checks(ledger: _Ledger, *, fail_open: bool = True, port: int | None = None):
    server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(ledger, server)
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port or bound}")
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    checks = BudgetChecks(stub, DependencyBreaker("ledger", _never), fail_open=fail_open)
    return server, channel, checks


async def _close(server, channel, checks) -> None:
    await checks.close()
    await channel.close()
    await server.stop(0)


async def test_requests_in_flight_share_one_call_and_the_answer_holds_a_second():
    ledger = _Ledger()
    server, channel, checks = await _checks(ledger)
    used = await asyncio.gather(*(checks.check("acme") for _ in range(20)))
    assert used == [0.25] * 20 and ledger.calls == 1
    assert await checks.check("acme") == 0.25 and ledger.calls == 1  # within the second: not asked
    await checks.check("globex")
    assert ledger.calls == 2  # another tenant is asked on its own
    await _close(server, channel, checks)


async def test_a_tenant_over_budget_is_refused_in_every_waiting_request():
    ledger = _Ledger(spent=1_200_000)
    server, channel, checks = await _checks(ledger)
    results = await asyncio.gather(*(checks.check("acme") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ResourceExhausted) for r in results) and ledger.calls == 1
    assert "budget exhausted: tenant acme has spent $1.20 of its $1.00" in results[0].message
    await _close(server, channel, checks)


async def test_a_request_that_goes_away_does_not_cancel_the_others_answer():
    ledger = _Ledger()
    server, channel, checks = await _checks(ledger)
    first = asyncio.ensure_future(checks.check("acme"))
    second = asyncio.ensure_future(checks.check("acme"))
    await asyncio.sleep(0.005)
    first.cancel()
    assert await second == 0.25 and ledger.calls == 1
    await _close(server, channel, checks)


@pytest.mark.parametrize("fail_open", [True, False])
async def test_an_unreachable_ledger_lets_requests_through_or_refuses_them_as_configured(fail_open):
    ledger = _Ledger()
    server, channel, checks = await _checks(ledger, fail_open=fail_open, port=free_port())
    if fail_open:
        assert await checks.check("acme") is None
    else:
        with pytest.raises(Unavailable, match="budget could not be checked"):
            await checks.check("acme")
    await _close(server, channel, checks)
