"""Budget checks before a request runs, asked of the CostLedger at most about once a second per tenant.

A tenant found within budget is not asked about again for BUDGET_RECHECK_SECONDS: one ledger call per
tenant per second instead of one per request. A hard stop is checked against spend the ledger holds: it
can be overshot by the requests admitted in that second and by those still running when it is reached
(their cost lands when they end, a batch later), never by requests admitted after. When that mark
lapses, the requests of the tenant in flight share one call instead of each making its own. When the
ledger cannot answer, `gateway.budget_fail_open` decides; its breaker logs an outage once, and while it
is open no request waits for the ledger.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

import grpc
from sophia.ledger.v1 import ledger_pb2 as ledger_pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.breaker import UNREACHABLE, DependencyBreaker
from libs.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

BUDGET_TIMEOUT_SECONDS = 0.3
BUDGET_RECHECK_SECONDS = 1.0


class BudgetChecks:
    def __init__(
        self, ledger: ledger_pb2_grpc.LedgerServiceStub, breaker: DependencyBreaker, *, fail_open: bool
    ) -> None:
        self._ledger = ledger
        self._breaker = breaker
        self._fail_open = fail_open
        self._within_budget_until: dict[str, float] = {}
        self._used: dict[str, float | None] = {}
        self._asking: dict[str, asyncio.Task[float | None]] = {}

    async def check(self, tenant_id: str) -> float | None:
        """Refuses a tenant over a hard budget; returns how much of its budget it has used (None: no
        budget, or the ledger could not say), for the Router to route cheaper near the limit."""
        if self._within_budget_until.get(tenant_id, 0.0) > time.monotonic():
            return self._used.get(tenant_id)
        if not self._breaker.allows():
            self._unchecked(tenant_id)
            return None
        asking = self._asking.get(tenant_id)
        if asking is None:
            # A context of its own: the call is every waiting request's, not bound to the first one's
            # deadline or request id.
            asking = asyncio.get_running_loop().create_task(
                self._ask(tenant_id), context=contextvars.Context()
            )
            self._asking[tenant_id] = asking
            asking.add_done_callback(lambda task: self._asked(tenant_id, task))
        # Shielded: a request that goes away does not cancel the answer the others wait for.
        return await asyncio.shield(asking)

    def _asked(self, tenant_id: str, task: asyncio.Task) -> None:
        del self._asking[tenant_id]
        if not task.cancelled():
            task.exception()  # retrieved: a refusal that no request waits for any more is no error

    async def _ask(self, tenant_id: str) -> float | None:
        try:
            reply = await self._ledger.CheckBudget(
                ledger_pb.CheckBudgetRequest(tenant_id=tenant_id), timeout=BUDGET_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in UNREACHABLE:
                self._breaker.record_failure(exc.code().name)  # logs once per outage
            else:
                log.warning("budget check failed (%s)", exc.code().name)
            self._unchecked(tenant_id)
            return None
        self._breaker.record_success()
        if reply.allowed:
            self._within_budget_until[tenant_id] = time.monotonic() + BUDGET_RECHECK_SECONDS
            used = reply.spent_micros / reply.limit_micros if reply.limit_micros else None
            self._used[tenant_id] = used
            return used
        raise ResourceExhausted(
            f"budget exhausted: tenant {tenant_id} has spent ${reply.spent_micros / 1e6:.2f} "
            f"of its ${reply.limit_micros / 1e6:.2f} monthly budget"
        )

    def _unchecked(self, tenant_id: str) -> None:
        """The ledger could not answer: let the request through or refuse it, as configured."""
        if not self._fail_open:
            raise Unavailable("budget could not be checked: the ledger is unavailable")
        self._within_budget_until[tenant_id] = time.monotonic() + BUDGET_RECHECK_SECONDS

    async def close(self) -> None:
        await self._breaker.aclose()
