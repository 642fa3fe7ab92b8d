"""Admission control: a bounded number of requests in flight per Gateway replica, a fair share per tenant.

Overload is shed, not queued: a request that finds no free slot is refused at once with a retry hint,
because a request that waits in a queue only gets slower and its work is wasted when its client gives
up. Two limits apply to every public RPC:

- the replica's `max_inflight`: beyond it the replica is overloaded → UNAVAILABLE (HTTP 503), which a
  client may retry at once against another replica;
- a tenant's share, `ceil(max_inflight * max_tenant_share)` slots: beyond it that tenant is asking for
  more than its part → RESOURCE_EXHAUSTED (HTTP 429), while the other tenants keep the rest.

A slot is held until the request ends, however it ends (answer, error, cancellation); a stream holds
its slot until its last message. The event loop runs one coroutine at a time, so the counters need no lock.
Slots held and refusals by reason are metrics (sophia.gateway.inflight, sophia.gateway.admission.refused).
"""

from __future__ import annotations

import enum
import math
import weakref
from collections import Counter
from types import TracebackType

from opentelemetry import metrics

from libs.errors import ResourceExhausted, Unavailable

RETRY_AFTER_MS = "retry-after-ms"
RETRY_AFTER = "retry-after"

_meter = metrics.get_meter("sophia.gateway")
# Every Admission of the process; the in-flight gauge is read from them when metrics are collected, so
# taking and releasing a slot costs no metric measurement.
_admissions: weakref.WeakSet[Admission] = weakref.WeakSet()


def _observe_inflight(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
    return [metrics.Observation(sum(admission.inflight for admission in list(_admissions)))]


_meter.create_observable_up_down_counter(
    "sophia.gateway.inflight", callbacks=[_observe_inflight], description="Requests holding an admission slot"
)
_refused = _meter.create_counter(
    "sophia.gateway.admission.refused", description="Requests refused at once by admission control"
)


class Refusal(enum.Enum):
    REPLICA_FULL = "replica_full"
    TENANT_SHARE_USED = "tenant_share_used"


def retry_trailers(retry_after_ms: int) -> tuple[tuple[str, str], ...]:
    """The precise hint, and the standard header in whole seconds (rounded up, so never 0)."""
    return (
        (RETRY_AFTER_MS, str(retry_after_ms)),
        (RETRY_AFTER, str(max(1, math.ceil(retry_after_ms / 1000)))),
    )


class Slot:
    """One admitted request; `release` (or leaving the `with` block) gives the slot back, once."""

    def __init__(self, admission: Admission, tenant_id: str) -> None:
        self._admission = admission
        self._tenant_id = tenant_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self._tenant_id)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    def __init__(self, *, max_inflight: int, max_tenant_share: float, retry_after_ms: int) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        if not 0 < max_tenant_share <= 1:
            raise ValueError("max_tenant_share must be in (0, 1]")
        self.max_inflight = max_inflight
        # Every tenant gets at least one slot, however small the share.
        self.max_per_tenant = max(1, math.ceil(max_inflight * max_tenant_share))
        self.retry_after_ms = retry_after_ms
        self._inflight = 0
        self._per_tenant: Counter[str] = Counter()
        _admissions.add(self)

    @property
    def inflight(self) -> int:
        return self._inflight

    def inflight_of(self, tenant_id: str) -> int:
        return self._per_tenant[tenant_id]

    def admit(self, tenant_id: str) -> Slot:
        """A slot for one request of `tenant_id`, or ServiceError (503/429 with retry-after) at once."""
        if self._inflight >= self.max_inflight:
            _refused.add(1, {"reason": Refusal.REPLICA_FULL.value})
            raise Unavailable(
                f"the gateway is at its limit of {self.max_inflight} requests in flight; retry shortly",
                trailers=retry_trailers(self.retry_after_ms),
            )
        if self._per_tenant[tenant_id] >= self.max_per_tenant:
            _refused.add(1, {"reason": Refusal.TENANT_SHARE_USED.value})
            raise ResourceExhausted(
                f"tenant {tenant_id!r} already has {self.max_per_tenant} requests in flight "
                "(its share of this gateway); retry shortly",
                trailers=retry_trailers(self.retry_after_ms),
            )
        self._inflight += 1
        self._per_tenant[tenant_id] += 1
        return Slot(self, tenant_id)

    def _release(self, tenant_id: str) -> None:
        self._inflight -= 1
        self._per_tenant[tenant_id] -= 1
        if not self._per_tenant[tenant_id]:
            # Tenants come and go: keep the counter to the ones with requests in flight.
            del self._per_tenant[tenant_id]
