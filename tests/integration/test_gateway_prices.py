"""The Gateway prices answers with the ledger's table (ListPrices), not a copy of its own."""

from __future__ import annotations

import grpc
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.config import PriceConfig
from libs.pricing import PriceTable
from services.gateway.usage.prices import LedgerPrices
from tests.support import free_port, internal_channel

# Priced in the Gateway's starting table only: the test mesh's ledger runs the reference config, which
# prices nothing (everything is the local model).
ONLY_LOCAL = PriceTable({"gateway-only-model": PriceConfig(input_per_mtok_usd=2, output_per_mtok_usd=4)})


async def test_the_ledgers_table_replaces_the_starting_one(mesh):
    async with internal_channel(mesh, "ledger") as channel:
        prices = LedgerPrices(ledger_pb2_grpc.LedgerServiceStub(channel), ONLY_LOCAL)
        assert prices.cost_micros("gateway-only-model", 1_000_000, 0, cached=False) == 2_000_000
        assert await prices.refresh()
    assert prices.cost_micros("gateway-only-model", 1_000_000, 0, cached=False) == 0


async def test_an_unreachable_ledger_keeps_the_table_in_force():
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        prices = LedgerPrices(ledger_pb2_grpc.LedgerServiceStub(channel), ONLY_LOCAL)
        assert not await prices.refresh()
    assert prices.cost_micros("gateway-only-model", 0, 1_000_000, cached=False) == 4_000_000
