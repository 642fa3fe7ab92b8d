"""Prices and costs in integer micro-dollars: exact conversion and round-half-up per token kind."""

from __future__ import annotations

import pytest

from libs.config import PriceConfig
from libs.pricing import PriceTable, token_cost_micros, usd_to_micros


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        (0.15, 150_000),  # 0.15 is 0.1499999… as a float; the conversion must still be exact
        (0.6, 600_000),
        (2.5, 2_500_000),
        (10.0, 10_000_000),
        (0.0, 0),
        (1.1, 1_100_000),
        (0.0000005, 1),  # half a micro-dollar rounds up
        (0.0000004, 0),
    ],
)
def test_usd_to_micros_is_exact_and_rounds_half_up(usd: float, micros: int) -> None:
    assert usd_to_micros(usd) == micros


@pytest.mark.parametrize(
    ("tokens", "micros_per_mtok", "cost"),
    [
        (1_000_000, 150_000, 150_000),
        (1, 150_000, 0),  # 0.15 micro-dollars
        (4, 150_000, 1),  # 0.6
        (5, 100_000, 1),  # exactly 0.5 → up
        (25, 100_000, 3),  # exactly 2.5 → 3, where round-half-even would give 2
        (0, 600_000, 0),
        (123_456_789, 2_500_000, 308_641_973),  # 308641972.5 → up
    ],
)
def test_token_cost_rounds_half_up(tokens: int, micros_per_mtok: int, cost: int) -> None:
    assert token_cost_micros(tokens, micros_per_mtok) == cost


def _table() -> PriceTable:
    return PriceTable(
        {
            "gpt-4o-mini": PriceConfig(input_per_mtok_usd=0.15, output_per_mtok_usd=0.6),
            "big": PriceConfig(input_per_mtok_usd=2.5, output_per_mtok_usd=10.0),
        }
    )


def test_cost_rounds_input_and_output_separately_then_sums() -> None:
    # 4 × 0.15 = 0.6 → 1 and 1 × 0.6 = 0.6 → 1: total 2, where rounding the sum (1.2) would give 1.
    assert _table().cost_micros("gpt-4o-mini", 4, 1, cached=False) == 2
    assert _table().cost_micros("big", 1000, 500, cached=False) == 2500 + 5000


def test_unpriced_model_and_cache_hits_cost_nothing() -> None:
    assert _table().cost_micros("smollm2-135m-instruct", 10_000, 10_000, cached=False) == 0
    assert _table().cost_micros("big", 10_000, 10_000, cached=True) == 0


def test_price_list_is_sorted_by_model_and_in_micros() -> None:
    prices = _table().prices()
    assert [p.model_id for p in prices] == ["big", "gpt-4o-mini"]
    assert (prices[1].input_micros_per_mtok, prices[1].output_micros_per_mtok) == (150_000, 600_000)
