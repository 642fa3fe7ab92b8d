"""The inbound caller's deadline, carried in a context variable to every outbound call of that RPC.

The server runtime records `context.time_remaining()` when an RPC starts; client channels and provider
adapters ask `outbound_timeout()` for their own timeout, so no outbound call can outlive its caller.
"""

from __future__ import annotations

import contextvars
import time

from libs.errors import DeadlineExceeded

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("sophia_deadline", default=None)


def start(time_remaining: float | None) -> contextvars.Token:
    absolute = None if time_remaining is None else time.monotonic() + time_remaining
    return _deadline.set(absolute)


def reset(token: contextvars.Token) -> None:
    _deadline.reset(token)


def remaining() -> float | None:
    """Seconds the inbound caller still waits, or None when it set no deadline."""
    absolute = _deadline.get()
    return None if absolute is None else absolute - time.monotonic()


def spent(slack: float) -> bool:
    """Whether the caller set a deadline and at most `slack` seconds of it are left: an outbound call that
    timed out now ran out of the caller's time, not of its own limit."""
    left = remaining()
    return left is not None and left <= slack


def outbound_timeout(*, margin: float, cap: float) -> float:
    """The timeout for one outbound call: the caller's remaining time less a margin, at most `cap`."""
    left = remaining()
    if left is None:
        return cap
    timeout = min(cap, left - margin)
    if timeout <= 0:
        raise DeadlineExceeded("the caller's deadline has passed")
    return timeout
