"""Cost advice from a tenant's recorded usage and the price table.

Every recommendation rests on the tenant's own usage records and cites them (how many, and the costliest
few); nothing is assumed about a model the tenant has not used for the work in question. Savings are what
following the advice would have saved over the last 30 days (`WINDOW`), priced record by record as the
ledger charges: a month's worth for a tenant with a month of history, a lower bound for a newer one.

- CHEAPER_MODEL: within one kind of work (task type and difficulty, as the Router classified it), a
  model answered requests that a cheaper model also answered at least `min_requests` times: the saving
  is those requests' cost at the cheaper model's price. Unclassified usage is never compared.
- REPEATED_PROMPTS: answers (not cache hits) whose prompt fingerprint and model repeat an earlier answer
  were paid again; the cache would have served them.
- FREQUENT_FALLBACK: the planned model failed first in at least `fallback_rate` of its requests; the
  saving is what the fallbacks cost beyond the planned model's price (0 when they were cheaper).
- BUDGET_PROJECTION: the month-end projection (see projection.py) exceeds the budget; it cites the
  month's costliest records and saves nothing by itself.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum

from libs.pricing import PriceTable
from services.ledger.projection import Projection
from services.ledger.usage import Difficulty, UsageRecord, month_bounds

WINDOW = timedelta(days=30)


class RecommendationKind(Enum):
    CHEAPER_MODEL = "cheaper_model"
    REPEATED_PROMPTS = "repeated_prompts"
    BUDGET_PROJECTION = "budget_projection"
    FREQUENT_FALLBACK = "frequent_fallback"


@dataclass(frozen=True)
class RecommendationSettings:
    # Fewer records than this are too thin to advise on (per model and kind of work, per finding).
    min_requests: int = 3
    # The share of a planned model's requests that must have fallen back before it is reported.
    fallback_rate: float = 0.2
    # Records listed as evidence per finding (the costliest); the count covers them all.
    evidence_rows: int = 10


@dataclass(frozen=True)
class Recommendation:
    kind: RecommendationKind
    summary: str
    monthly_saving_micros: int
    evidence_count: int
    evidence: tuple[UsageRecord, ...]
    model_id: str = ""
    alternative_model_id: str = ""
    task_type: str = ""
    difficulty: Difficulty = Difficulty.UNSPECIFIED
    requests: int = 0
    projection: Projection | None = None


@dataclass(frozen=True)
class RecommendationReport:
    recommendations: list[Recommendation]
    window_start: datetime
    window_end: datetime
    projection: Projection


def usd(micros: int) -> str:
    return f"${micros / 1_000_000:,.4f}"


class Evidence:
    """The records behind one finding: how many there are, and the `keep` costliest (a bounded heap;
    of equal costs, the first added)."""

    def __init__(self, keep: int) -> None:
        self.count = 0
        self._keep = keep
        # (cost, -arrival, record): the heap's smallest entry is the one to drop first.
        self._heap: list[tuple[int, int, UsageRecord]] = []

    def add(self, record: UsageRecord) -> None:
        self.count += 1
        entry = (record.cost_micros, -self.count, record)
        if len(self._heap) < self._keep:
            heapq.heappush(self._heap, entry)
        elif self._keep and entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def rows(self) -> tuple[UsageRecord, ...]:
        """Costliest first; equal costs in the order they were added (records come oldest first)."""
        ordered = sorted(self._heap, key=lambda entry: (-entry[0], -entry[1]))
        return tuple(record for _, _, record in ordered)


@dataclass
class _ModelWork:
    """One model's answers to one kind of work, and what the same tokens cost at every priced model."""

    evidence: Evidence
    cost_micros: int = 0
    cost_at: dict[str, int] = field(default_factory=dict)


@dataclass
class _Repeats:
    evidence: Evidence
    saving_micros: int = 0
    prompts: set[str] = field(default_factory=set)


@dataclass
class _Fallbacks:
    evidence: Evidence
    requests: int = 0
    # What the fallbacks cost beyond the planned model's price for the same tokens (may be negative).
    extra_micros: int = 0


class UsageAnalysis:
    """Accumulates a tenant's records one at a time (oldest first), then tells what it found."""

    def __init__(self, prices: PriceTable, settings: RecommendationSettings, now: datetime) -> None:
        self._prices = prices
        self._priced = [price.model_id for price in prices.prices()]
        self._settings = settings
        self.window_start = now - WINDOW
        self.window_end = now
        self.month_start, _ = month_bounds(now)
        # (task type, difficulty) → model → its answers.
        self._work: dict[tuple[str, Difficulty], dict[str, _ModelWork]] = {}
        # (model, prompt fingerprint) already answered once.
        self._answered: set[tuple[str, str]] = set()
        self._repeats: dict[str, _Repeats] = {}
        self._fallbacks: dict[str, _Fallbacks] = {}
        self._month = self._evidence()

    @property
    def scan_start(self) -> datetime:
        """Where the records to feed begin: the window, or the month's start if that is earlier."""
        return min(self.window_start, self.month_start)

    def _evidence(self) -> Evidence:
        return Evidence(self._settings.evidence_rows)

    def _cost(self, model_id: str, record: UsageRecord) -> int:
        return self._prices.cost_micros(model_id, record.input_tokens, record.output_tokens, cached=False)

    def add(self, record: UsageRecord) -> None:
        if record.occurred_at >= self.month_start and record.cost_micros > 0:
            self._month.add(record)
        if not self.window_start <= record.occurred_at < self.window_end:
            return
        if record.prompt_fingerprint:
            self._add_prompt(record)
        if record.cached:
            return  # nothing was paid, no model was tried
        if record.task_type:
            self._add_work(record)
        if record.planned_model_id:
            self._add_plan(record)

    def _add_work(self, record: UsageRecord) -> None:
        models = self._work.setdefault((record.task_type, record.difficulty), {})
        work = models.setdefault(record.model_id, _ModelWork(self._evidence()))
        work.evidence.add(record)
        work.cost_micros += record.cost_micros
        for model_id in self._priced:
            work.cost_at[model_id] = work.cost_at.get(model_id, 0) + self._cost(model_id, record)

    def _add_prompt(self, record: UsageRecord) -> None:
        key = (record.model_id, record.prompt_fingerprint)
        if key not in self._answered:
            self._answered.add(key)
            return
        if record.cached:
            return  # the cache already served this repeat
        repeats = self._repeats.setdefault(record.model_id, _Repeats(self._evidence()))
        repeats.evidence.add(record)
        repeats.saving_micros += record.cost_micros
        repeats.prompts.add(record.prompt_fingerprint)

    def _add_plan(self, record: UsageRecord) -> None:
        fallbacks = self._fallbacks.setdefault(record.planned_model_id, _Fallbacks(self._evidence()))
        fallbacks.requests += 1
        if record.fell_back:
            fallbacks.evidence.add(record)
            fallbacks.extra_micros += record.cost_micros - self._cost(record.planned_model_id, record)

    # --- findings ----------------------------------------------------------------------------------

    def recommendations(self, projection: Projection) -> list[Recommendation]:
        """Largest saving first; equal savings in a stable order (kind, models, work)."""
        found = [
            *self._cheaper_models(),
            *self._repeated_prompts(),
            *self._frequent_fallbacks(),
            *self._budget(projection),
        ]
        kinds = list(RecommendationKind)
        return sorted(
            found,
            key=lambda r: (
                -r.monthly_saving_micros,
                kinds.index(r.kind),
                r.model_id,
                r.alternative_model_id,
                r.task_type,
                r.difficulty.value,
            ),
        )

    def _cheaper_models(self) -> Iterable[Recommendation]:
        enough = self._settings.min_requests
        for (task_type, difficulty), models in self._work.items():
            proven = {model_id for model_id, work in models.items() if work.evidence.count >= enough}
            for model_id, work in models.items():
                if work.cost_micros == 0 or work.evidence.count < enough:
                    continue
                # Unpriced models (the local ones) cost nothing for any tokens.
                costs = {other: work.cost_at.get(other, 0) for other in proven - {model_id}}
                if not costs:
                    continue
                alternative = min(costs, key=lambda other: (costs[other], other))
                saving = work.cost_micros - costs[alternative]
                if saving <= 0:
                    continue
                proof = models[alternative].evidence
                work_name = f"{task_type}/{difficulty.value}" if difficulty.value else task_type
                yield Recommendation(
                    kind=RecommendationKind.CHEAPER_MODEL,
                    summary=(
                        f"{model_id} answered {work.evidence.count} {work_name} requests for "
                        f"{usd(work.cost_micros)}; {alternative}, which answered {proof.count} of the same "
                        f"kind, would have cost {usd(costs[alternative])}"
                    ),
                    monthly_saving_micros=saving,
                    evidence_count=work.evidence.count + proof.count,
                    evidence=work.evidence.rows() + proof.rows(),
                    model_id=model_id,
                    alternative_model_id=alternative,
                    task_type=task_type,
                    difficulty=difficulty,
                )

    def _repeated_prompts(self) -> Iterable[Recommendation]:
        for model_id, repeats in self._repeats.items():
            if repeats.saving_micros == 0 or repeats.evidence.count < self._settings.min_requests:
                continue
            yield Recommendation(
                kind=RecommendationKind.REPEATED_PROMPTS,
                summary=(
                    f"{repeats.evidence.count} answers of {model_id} repeated {len(repeats.prompts)} earlier "
                    f"prompts and were paid again ({usd(repeats.saving_micros)}); served from the cache "
                    "(cache on, temperature within cache.max_temperature) they would have cost nothing"
                ),
                monthly_saving_micros=repeats.saving_micros,
                evidence_count=repeats.evidence.count,
                evidence=repeats.evidence.rows(),
                model_id=model_id,
            )

    def _frequent_fallbacks(self) -> Iterable[Recommendation]:
        for model_id, fallbacks in self._fallbacks.items():
            failed = fallbacks.evidence.count
            if (
                fallbacks.requests < self._settings.min_requests
                or failed == 0
                or failed < self._settings.fallback_rate * fallbacks.requests
            ):
                continue
            extra = max(0, fallbacks.extra_micros)
            yield Recommendation(
                kind=RecommendationKind.FREQUENT_FALLBACK,
                summary=(
                    f"{model_id} failed first in {failed} of {fallbacks.requests} requests "
                    f"({failed / fallbacks.requests:.0%}) and a fallback answered, for {usd(extra)} more "
                    f"than {model_id} would have cost; check its provider, or plan another model first"
                ),
                monthly_saving_micros=extra,
                evidence_count=failed,
                evidence=fallbacks.evidence.rows(),
                model_id=model_id,
                requests=fallbacks.requests,
            )

    def _budget(self, projection: Projection) -> Iterable[Recommendation]:
        if not projection.exceeds_budget:
            return
        yield Recommendation(
            kind=RecommendationKind.BUDGET_PROJECTION,
            summary=(
                f"{projection.month} spend is projected at {usd(projection.linear_micros)} (month's average "
                f"rate) and {usd(projection.trend_micros)} (last 7 days' rate), over the budget of "
                f"{usd(projection.limit_micros)} ({usd(projection.spent_micros)} spent so far)"
            ),
            monthly_saving_micros=0,
            evidence_count=self._month.count,
            evidence=self._month.rows(),
            projection=projection,
        )
