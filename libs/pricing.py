"""Prices and costs in integer micro-dollars, so that sums are exact and never drift."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from libs.config import PriceConfig

MICROS_PER_USD = 1_000_000
TOKENS_PER_MTOK = 1_000_000


@dataclass(frozen=True)
class Price:
    model_id: str
    input_micros_per_mtok: int
    output_micros_per_mtok: int


def usd_to_micros(usd: float) -> int:
    """Dollars (as YAML gives them, a float) to micro-dollars, rounded half up.

    `str()` yields the shortest decimal that reads back as the same float ("0.15", not
    0.1499999999999999944…), so going through Decimal gives the price the config author wrote.
    """
    return int((Decimal(str(usd)) * MICROS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def token_cost_micros(tokens: int, micros_per_mtok: int) -> int:
    """tokens × price / 1e6, rounded half up, in integers only (both operands are non-negative)."""
    return (tokens * micros_per_mtok + TOKENS_PER_MTOK // 2) // TOKENS_PER_MTOK


class PriceTable:
    def __init__(self, prices: Mapping[str, PriceConfig]) -> None:
        self._prices = {
            model_id: Price(
                model_id=model_id,
                input_micros_per_mtok=usd_to_micros(price.input_per_mtok_usd),
                output_micros_per_mtok=usd_to_micros(price.output_per_mtok_usd),
            )
            for model_id, price in prices.items()
        }

    @classmethod
    def of(cls, prices: Iterable[Price]) -> PriceTable:
        """A table of prices already in micro-dollars (e.g. as the ledger's ListPrices gives them)."""
        table = cls({})
        table._prices = {price.model_id: price for price in prices}
        return table

    def prices(self) -> list[Price]:
        return [self._prices[model_id] for model_id in sorted(self._prices)]

    def cost_micros(self, model_id: str, input_tokens: int, output_tokens: int, *, cached: bool) -> int:
        """Input and output are rounded separately, then summed; unpriced models and cache hits are free."""
        price = self._prices.get(model_id)
        if price is None or cached:
            return 0
        return token_cost_micros(input_tokens, price.input_micros_per_mtok) + token_cost_micros(
            output_tokens, price.output_micros_per_mtok
        )
