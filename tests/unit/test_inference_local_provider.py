"""The Gateway's side of ModelInference: which of its statuses end the fallback chain and which move on."""

import grpc
import pytest

from libs import deadline
from services.gateway.providers.local import _provider_error


def refusal(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def test_a_prompt_too_long_for_the_local_window_moves_on_to_the_next_model():
    error = _provider_error(refusal(grpc.StatusCode.OUT_OF_RANGE, "messages: the prompt is 9000 tokens"))
    assert error.retryable
    assert error.kind == "context_window"
    # With no model left, the caller hears the field it has to change, as a 400.
    assert (error.status, error.message) == ("INVALID_ARGUMENT", "messages: the prompt is 9000 tokens")


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND])
def test_the_callers_own_mistakes_end_the_chain(code):
    error = _provider_error(refusal(code, "options.temperature: must be between 0 and 2"))
    assert not error.retryable and error.status == code.name


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, "unavailable"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "timeout"),
    ],
)
def test_an_overloaded_or_slow_local_model_moves_on(code, kind):
    error = _provider_error(refusal(code, "inference is at capacity"))
    assert error.retryable and error.kind == kind


def test_the_callers_own_deadline_passing_is_no_verdict_on_the_local_model():
    """With the caller's time used up, DEADLINE_EXCEEDED is the caller's deadline (not retried, reported as
    no verdict), so one tenant's short deadlines cannot open the local model's breaker for everyone."""
    token = deadline.start(0.01)
    try:
        error = _provider_error(refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    finally:
        deadline.reset(token)
    assert (error.kind, error.retryable) == ("deadline", False)


def test_a_prompt_too_long_for_the_local_model_is_reported_as_rejected_not_as_a_failure():
    """Through the Gateway's report and the Router's reading of it: a long prompt must not count
    against the local model's health (enough of them would open its breaker)."""
    from sophia.router.v1 import router_pb2 as router_pb

    from services.gateway.domain import Target
    from services.gateway.serving.fallback import Attempt
    from services.gateway.serving.router_client import attempt_report
    from services.router.health import Outcome
    from services.router.servicer import outcome_reports

    error = _provider_error(refusal(grpc.StatusCode.OUT_OF_RANGE, "messages: the prompt is 23000 tokens"))
    assert error.retryable  # the chain still goes on to a model with a larger window
    target = Target("smollm2-135m-instruct", "local", "smollm2-135m-instruct")
    report = attempt_report(Attempt(target, error.kind, 5, error.retryable))
    (recorded,) = outcome_reports(router_pb.ReportOutcomeRequest(reports=[report]))
    assert recorded.outcome is Outcome.REJECTED
