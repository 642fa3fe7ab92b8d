"""Outcome statistics per (provider, model), fed by ReportOutcome, kept in memory.

Each pair keeps success and failure counts and a rolling window of recent latencies. Scoring and circuit
breakers will read these same records, so they are plain objects with a `record` method to extend.
"""

from __future__ import annotations

import enum
import statistics
from collections import deque
from dataclasses import dataclass, field

from libs.errors import ResourceExhausted

LATENCY_WINDOW = 100
# A ceiling on distinct pairs so that a caller inventing names cannot grow the process without bound.
MAX_TRACKED_PAIRS = 4096


class Outcome(enum.Enum):
    SUCCESS = "success"
    RETRYABLE_ERROR = "retryable_error"
    FATAL_ERROR = "fatal_error"
    TIMEOUT = "timeout"


@dataclass
class ModelStats:
    successes: int = 0
    failures: int = 0
    # Latencies of successful calls only: a quick 429 says nothing about how fast a model answers.
    latencies_ms: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def record(self, outcome: Outcome, latency_ms: int) -> None:
        if outcome is Outcome.SUCCESS:
            self.successes += 1
            self.latencies_ms.append(latency_ms)
        else:
            self.failures += 1

    @property
    def error_rate(self) -> float:
        total = self.successes + self.failures
        return self.failures / total if total else 0.0

    @property
    def p50_latency_ms(self) -> int:
        return statistics.median_low(self.latencies_ms) if self.latencies_ms else 0


@dataclass(frozen=True)
class HealthReport:
    provider: str
    model_id: str
    successes: int
    failures: int
    error_rate: float
    p50_latency_ms: int


class HealthBook:
    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], ModelStats] = {}

    def record(self, provider: str, model_id: str, outcome: Outcome, latency_ms: int) -> None:
        key = (provider, model_id)
        stats = self._stats.get(key)
        if stats is None:
            if len(self._stats) >= MAX_TRACKED_PAIRS:
                raise ResourceExhausted(f"already tracking {MAX_TRACKED_PAIRS} provider/model pairs")
            stats = self._stats[key] = ModelStats()
        stats.record(outcome, latency_ms)

    def reports(self) -> list[HealthReport]:
        return [
            HealthReport(provider, model_id, s.successes, s.failures, s.error_rate, s.p50_latency_ms)
            for (provider, model_id), s in sorted(self._stats.items())
        ]
