"""What every provider adapter offers the Gateway's fallback loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Protocol

from services.gateway.domain import ChatRequest, Completion, CompletionChunk, Target

# The ProviderError kind of a call cut by the caller's own deadline: no verdict on the provider, and not
# retried on another target (the time is up).
CALLER_DEADLINE = "deadline"


class ProviderCall:
    """Whether the provider call under way has sent its request: the fallback loop makes one per attempt
    (`current_call`), an adapter marks it (`note_request_sent`). A call its client cut after that was still
    received, and billed, by the provider. `on_sent` runs once, the moment the request has gone (the
    request path journals the call's stand-in record then, while the provider works)."""

    __slots__ = ("on_sent", "sent")

    def __init__(self, on_sent: Callable[[], None] | None = None) -> None:
        self.sent = False
        self.on_sent = on_sent


current_call: ContextVar[ProviderCall | None] = ContextVar("sophia_provider_call", default=None)


def note_request_sent() -> None:
    call = current_call.get()
    if call is not None and not call.sent:
        call.sent = True
        if call.on_sent is not None:
            call.on_sent()


class ProviderError(Exception):
    """A failed provider call. `retryable` decides whether the next target in the chain is tried.

    The message is safe to show a client: it never holds a key, a provider URL or a raw provider body.
    `status` is the gRPC status name the Gateway answers with when no target is left.
    """

    def __init__(self, message: str, *, retryable: bool, status: str = "UNAVAILABLE", kind: str = "error"):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        # A short class for metrics and the router's health feed, e.g. "http_429", "timeout".
        self.kind = kind


class Provider(Protocol):
    name: str

    def unsupported(self, request: ChatRequest) -> tuple[str, str] | None:
        """(field, reason) for the first request feature this provider cannot honour, else None."""

    async def complete(self, target: Target, request: ChatRequest) -> Completion: ...

    def stream(self, target: Target, request: ChatRequest) -> AsyncIterator[CompletionChunk]: ...

    async def embed(
        self, target: Target, inputs: list[str] | list[list[int]], dimensions: int | None = None
    ) -> tuple[list[list[float]], int]:
        """`dimensions` is passed only to models configured with `accepts_dimensions`, token arrays only
        to models configured with `accepts_token_input`."""

    async def close(self) -> None: ...
