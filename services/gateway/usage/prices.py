"""The ledger's price table, mirrored in the Gateway.

Prices live in CostLedger, which charges every usage record with them. The Gateway also prices each answer
(the `x-sophia-cost-usd` header) before the ledger has the record, so it keeps a copy of the ledger's table
(`ListPrices`), fetched at start-up and refreshed periodically: both sides charge with the same prices, and
a price change reaches the header without a Gateway restart. Until the ledger first answers, the prices in
the Gateway's own config file (the same file the ledger reads) stand in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from libs.pricing import Price, PriceTable

log = logging.getLogger(__name__)

REFRESH_SECONDS = 30.0
# While the ledger has not answered yet, ask again sooner.
RETRY_SECONDS = 2.0
LIST_TIMEOUT_SECONDS = 2.0


class LedgerPrices:
    def __init__(self, ledger: ledger_pb2_grpc.LedgerServiceStub, initial: PriceTable) -> None:
        self._ledger = ledger
        self._table = initial
        self._from_ledger = False
        self._task: asyncio.Task | None = None

    def cost_micros(self, model_id: str, input_tokens: int, output_tokens: int, *, cached: bool) -> int:
        return self._table.cost_micros(model_id, input_tokens, output_tokens, cached=cached)

    async def refresh(self) -> bool:
        """Takes the ledger's current table; False (the old table kept) when the ledger cannot answer."""
        try:
            request = ledger_pb2.ListPricesRequest()
            reply = await self._ledger.ListPrices(request, timeout=LIST_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            log.debug("prices not refreshed from the ledger: %s", exc.code().name)
            return False
        self._table = PriceTable.of(
            Price(p.model_id, p.input_micros_per_mtok, p.output_micros_per_mtok) for p in reply.prices
        )
        if not self._from_ledger:
            log.info("pricing answers with the ledger's table (%d priced models)", len(reply.prices))
        self._from_ledger = True
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        while True:
            fresh = await self.refresh()
            await asyncio.sleep(REFRESH_SECONDS if fresh else RETRY_SECONDS)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
