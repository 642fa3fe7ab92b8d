"""The chat request path: plan the targets, then try them in order within the caller's deadline.

Fallback rules: a retryable failure (429, 5xx, timeout, dropped connection) moves on to the next
target; a non-retryable one (the request itself is bad) ends the chain at once. A stream falls back only
before its first chunk has been sent: after that the client already holds part of an answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from libs import errors
from services.gateway import metrics
from services.gateway.domain import ChatRequest, Completion, CompletionChunk, Target
from services.gateway.providers.base import (
    CALLER_DEADLINE,
    Provider,
    ProviderCall,
    ProviderError,
    current_call,
)
from services.gateway.serving.router_client import Plan

log = logging.getLogger(__name__)

# The attempt of a stream whose client went away before its first chunk.
CLIENT_GONE = "client_gone"
# Attempts the client cut short (gone, or its deadline passed): no verdict on the target, and billed the
# prompt when the provider had been sent it (request_flow).
CUT_BY_CLIENT = frozenset({CALLER_DEADLINE, CLIENT_GONE})

_STATUS_ERRORS = {
    "NOT_FOUND": errors.NotFound,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "DEADLINE_EXCEEDED": errors.DeadlineExceeded,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    "CANCELLED": errors.Cancelled,
}


@dataclass
class Attempt:
    target: Target
    outcome: str  # "success" or the ProviderError kind
    latency_ms: int
    retryable: bool = True
    # time.perf_counter() when the attempt began, and its time to first token (streams only; 0 unknown).
    started: float = 0.0
    time_to_first_token_ms: int = 0
    sent: bool = False  # the provider was sent the request (see ProviderCall)


@dataclass
class Served:
    target: Target
    attempts: list[Attempt]


class _RejectedByProvider(errors.ServiceError):
    """The provider refused the request itself; its message already names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


def provider_failure(error: ProviderError, attempts: list[Attempt]) -> errors.ServiceError:
    tried = ", ".join(f"{a.target.provider}/{a.target.model_id}: {a.outcome}" for a in attempts)
    message = f"{error.message} (tried {tried})" if len(attempts) > 1 else error.message
    if error.status == "INVALID_ARGUMENT":
        return _RejectedByProvider(message)
    return _STATUS_ERRORS.get(error.status, errors.Unavailable)(message)


class ChatExecutor:
    def __init__(self, providers: dict[str, Provider]) -> None:
        self._providers = providers

    def usable_targets(self, plan: Plan, request: ChatRequest) -> list[Target]:
        """The plan's targets whose provider can honour every feature the request uses."""
        usable, refusal = [], None
        for target in plan.targets:
            provider = self._providers.get(target.provider)
            if provider is None:
                log.error("route names unknown provider %r", target.provider)
                continue
            problem = provider.unsupported(request)
            if problem is None:
                usable.append(target)
            else:
                refusal = refusal or (target, problem)
        if not usable:
            if refusal is not None:
                target, (field, reason) = refusal
                raise errors.InvalidArgument(field, f"{reason} ({target.model_id})")
            raise errors.Unavailable("no provider is configured for the routed models")
        return usable

    async def complete(
        self,
        targets: list[Target],
        request: ChatRequest,
        attempts: list[Attempt],
        on_sent: Callable[[Target], None] | None = None,
    ) -> tuple[Completion, Served]:
        """Tries `targets` in order; every try is appended to the caller's `attempts`, failed or not.
        `on_sent(target)` runs the moment a provider has been sent the request (see ProviderCall)."""
        for target in targets:
            started = time.perf_counter()
            call = ProviderCall(functools.partial(on_sent, target) if on_sent is not None else None)
            marked = current_call.set(call)
            try:
                completion = await self._providers[target.provider].complete(target, request)
            except ProviderError as error:
                attempts.append(Attempt(target, error.kind, _ms(started), error.retryable, sent=call.sent))
                _log_failure(target, error, started)
                if not error.retryable or target is targets[-1]:
                    raise provider_failure(error, attempts) from None
                continue
            finally:
                current_call.reset(marked)
            attempts.append(Attempt(target, "success", _ms(started)))
            metrics.provider_call(target.provider, target.model_id, time.perf_counter() - started)
            return completion, Served(target, attempts)
        raise errors.Unavailable("no target to try")

    async def stream(
        self, targets: list[Target], request: ChatRequest, attempts: list[Attempt]
    ) -> tuple[CompletionChunk, AsyncIterator[CompletionChunk], Served]:
        """Opens the first target that yields a first chunk; returns that chunk and the rest of the stream."""
        for target in targets:
            started = time.perf_counter()
            chunks = self._providers[target.provider].stream(target, request)
            call = ProviderCall()
            marked = current_call.set(call)
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = CompletionChunk(finish_reason="stop")
            except asyncio.CancelledError:
                attempts.append(Attempt(target, CLIENT_GONE, _ms(started), False, sent=call.sent))
                raise
            except ProviderError as error:
                await chunks.aclose()
                attempts.append(Attempt(target, error.kind, _ms(started), error.retryable, sent=call.sent))
                _log_failure(target, error, started)
                if not error.retryable or target is targets[-1]:
                    raise provider_failure(error, attempts) from None
                continue
            finally:
                current_call.reset(marked)
            attempts.append(Attempt(target, "success", _ms(started), True, started, _ms(started)))
            # The call's duration is recorded when the stream ends (request_flow), its first chunk now.
            metrics.time_to_first_token.record(
                time.perf_counter() - started,
                {"gen_ai.provider.name": target.provider, "gen_ai.request.model": target.model_id},
            )
            return first, chunks, Served(target, attempts)
        raise errors.Unavailable("no target to try")


def _log_failure(target: Target, error: ProviderError, started: float) -> None:
    metrics.provider_errors.add(
        1, {"provider": target.provider, "model": target.model_id, "kind": error.kind}
    )
    metrics.provider_call(target.provider, target.model_id, time.perf_counter() - started, error.kind)
    log.warning(
        "provider %s failed for %s: %s",
        target.provider,
        target.model_id,
        error.kind,
        extra={"retryable": error.retryable, "detail": error.message},
    )


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
