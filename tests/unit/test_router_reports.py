"""ReportOutcome takes reports on configured targets only: one naming anything else is refused naming
its field, and the batch's other reports are still recorded."""

from __future__ import annotations

import asyncio

import pytest
from sophia.router.v1 import router_pb2 as pb

from libs.config import Config
from libs.errors import InvalidArgument
from services.router.health import Outcome
from services.router.router import Router, RoutingState
from services.router.servicer import RouterServicer

CONFIG = Config.model_validate(
    {
        "providers": {
            "local": {"type": "local"},
            "openai": {"type": "openai", "base_url": "http://127.0.0.1:1"},
        },
        "models": {
            "local-small": {"provider": "local"},
            "gpt": {"provider": "openai"},
            "retired": {"provider": "openai", "enabled": False},
            "embed": {"provider": "local", "kind": "embedding"},
        },
        "routing": {"default_chain": ["local-small"], "default_embedding_model": "embed"},
    }
)


class _Book:
    """Stands in for HealthBook: keeps what it is asked to record."""

    def __init__(self) -> None:
        self.recorded = []

    async def record(self, reports):
        self.recorded += reports
        return len(reports)


def _servicer() -> tuple[RouterServicer, _Book]:
    book = _Book()
    return RouterServicer(Router(RoutingState(CONFIG, None), None), book, None), book


def _entry(provider: str, model_id: str, outcome=pb.OUTCOME_RETRYABLE_ERROR, **extra) -> pb.OutcomeReport:
    return pb.OutcomeReport(provider=provider, model_id=model_id, outcome=outcome, latency_ms=3, **extra)


def _report(servicer, *entries):
    return asyncio.run(servicer.ReportOutcome(pb.ReportOutcomeRequest(reports=entries), None))


def test_reports_on_configured_targets_are_recorded_disabled_ones_included():
    servicer, book = _servicer()
    reply = _report(
        servicer, _entry("openai", "gpt"), _entry("openai", "retired"), _entry("local", "local-small")
    )
    assert reply.recorded == 3 and len(book.recorded) == 3


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (_entry("evil", "m0-1"), "reports[1].model_id"),
        (_entry("local", "gpt"), "reports[1].provider"),  # a configured model under another provider
    ],
)
def test_a_report_on_no_configured_target_is_refused_naming_it_and_the_others_recorded(entry, field):
    servicer, book = _servicer()
    with pytest.raises(InvalidArgument) as caught:
        _report(servicer, _entry("openai", "gpt"), entry, _entry("local", "local-small", pb.OUTCOME_SUCCESS))
    assert caught.value.field == field
    assert "1 of 3 reports" in caught.value.problem and "the other 2 were" in caught.value.problem
    assert [(r.provider, r.model_id) for r in book.recorded] == [("openai", "gpt"), ("local", "local-small")]


def test_a_context_window_error_is_no_verdict_on_the_target():
    servicer, book = _servicer()
    _report(
        servicer,
        _entry("local", "local-small", error="context_window"),
        _entry("openai", "gpt", error="http_503"),
    )
    assert [r.outcome for r in book.recorded] == [Outcome.REJECTED, Outcome.FAILURE]
