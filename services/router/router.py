"""The Router's domain: turns a request into an ordered plan of targets, in stages.

1. Static rules: an explicit model gets itself and its fallbacks; an embedding its model; a client's
   `task_type` with a `routing.task_types` rule gets that chain.
2. Otherwise the preference decides (`balanced` when unspecified): `fast`, `quality` and `code` take
   their configured chain or, without one, every chat model; `balanced` classifies the prompt (task
   type and difficulty): a classified task type with a rule gets that chain, a simple prompt every chat
   model (cheapest first), a complex one the `quality` chain (or every chat model, best first). A tenant
   that has used `routing.budget_cheaper_above` of its budget gets its candidates cheapest first.
3. Filters: enabled, context window ≥ estimated tokens, tools / response_format support.
4. Feature flags: a model whose flag is off for the tenant is skipped.
5. Health: a target whose breaker is open is skipped while others remain (else it goes last); once its
   cool-down is over one request claims the probe and keeps it in place.
6. Scoring orders the candidates of scored plans: cost (ledger prices for the estimated tokens),
   quality (routing.model_profiles), live p50 latency (fast). Automatic plans end in the default chain.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from libs.config import Config, ModelProfile
from libs.errors import FailedPrecondition, InvalidArgument, shown
from libs.feature_flags import EMPTY, FlagSet
from libs.routing_rules import RouteQuery, RouteTarget, RoutingRules, is_explicit, unique
from services.router.classifier import Classification, Difficulty, TaskClassifier
from services.router.health import BreakerView, CircuitState, HealthBook

DEFAULT_PROFILE = ModelProfile()
EMBEDDING_DIMENSIONS = 384
# How long after a provider call's timeout its outcome may still be on its way: the Gateway sends its
# reports every 50 ms, each batch with a 1 s deadline. A probe not answered by then was never tried or
# its report was lost (see HealthBook.claim_probe).
PROBE_REPORT_SLACK_SECONDS = 2.0


class Preference(StrEnum):
    FAST = "fast"
    QUALITY = "quality"
    CODE = "code"
    BALANCED = "balanced"


class Decision(StrEnum):
    """Which stage chose the plan: the label of the decisions metric."""

    EXPLICIT_MODEL = "explicit_model"
    EMBEDDING = "embedding"
    TASK_TYPE_RULE = "task_type_rule"
    PREFERENCE = "preference"
    SIMPLE_CHEAPEST = "simple_cheapest"
    COMPLEX_QUALITY = "complex_quality"
    BUDGET = "budget"


@dataclass(frozen=True)
class Request:
    """What the Router knows of a request."""

    model: str = ""
    kind: str = "chat"
    task_type: str = ""
    preference: Preference | None = None
    estimated_tokens: int = 0
    tenant_id: str = ""
    tenant_tier: str = ""
    # The last user message and the rest of the conversation (cheap features only).
    prompt: str = ""
    context: str = ""
    # The normalised prompt's embedding when the caller has it.
    embedding: Sequence[float] | None = None
    uses_tools: bool = False
    uses_response_format: bool = False
    budget_used_fraction: float | None = None


@dataclass(frozen=True)
class Plan:
    targets: tuple[RouteTarget, ...]
    reason: str
    decision: Decision
    task_type: str = ""
    difficulty: Difficulty | None = None
    confidence: float = 0.0
    # Time spent classifying, embedding excluded (for the classification latency metric).
    classify_seconds: float = 0.0


@dataclass(frozen=True)
class RoutingState:
    """One consistent snapshot of what routing reads: replaced whole on reload, never mutated."""

    config: Config
    classifier: TaskClassifier | None
    flags: FlagSet = EMPTY
    rules: RoutingRules = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", RoutingRules(self.config))

    def profile(self, model_id: str) -> ModelProfile:
        return self.config.routing.model_profiles.get(model_id, DEFAULT_PROFILE)

    def cost_per_mtok(self, model_id: str) -> float:
        price = self.config.ledger.prices.get(model_id)
        return price.input_per_mtok_usd + price.output_per_mtok_usd if price else 0.0

    def chat_models(self) -> list[str]:
        return [m for m, model in self.config.models.items() if model.kind == "chat"]


# Returns None when it cannot embed in time: the prompt is then routed unclassified.
Embed = Callable[[str], Awaitable[Sequence[float] | None]]


class Router:
    def __init__(self, state: RoutingState, health: HealthBook | None, embed: Embed | None = None) -> None:
        self.state = state
        self._health = health
        self._embed = embed

    async def route(self, request: Request) -> Plan:
        state = self.state  # read once: a reload mid-route never mixes two configs
        if request.estimated_tokens < 0:
            raise InvalidArgument("estimated_tokens", "must not be negative")
        if request.kind == "embedding":
            plan = state.rules.route(RouteQuery(request.model, "embedding", request.estimated_tokens))
            return Plan(plan.targets, plan.reason, Decision.EMBEDDING)
        if is_explicit(request.model):
            chain, reason = state.rules.explicit_chain(request.model)
            notes: list[str] = []
            targets = await self._breakers(state, self._candidates(state, request, chain, notes), notes)
            if not targets:
                raise FailedPrecondition(f"no model can serve this request ({reason}): {'; '.join(notes)}")
            return Plan(targets, _joined(reason, notes), Decision.EXPLICIT_MODEL, request.task_type)
        return await self._automatic(state, request)

    async def _automatic(self, state: RoutingState, request: Request) -> Plan:
        routing = state.config.routing
        notes: list[str] = []
        classification, classify_seconds = await self._classify(state, request)
        task_type = request.task_type or (classification.task_type if classification else "")
        difficulty = classification.difficulty if classification else None
        confidence = classification.confidence if classification and not request.task_type else 0.0
        preference = request.preference or Preference.BALANCED
        scored = False
        if request.task_type and request.task_type in routing.task_types:
            chain, reason, decision = (
                routing.task_types[request.task_type],
                f"task_type={task_type}",
                Decision.TASK_TYPE_RULE,
            )
        else:
            if request.task_type:
                notes.append(f"task_type {shown(request.task_type)} has no rule")
            if preference is not Preference.BALANCED:
                chain, reason, decision = self._preference_chain(state, preference)
                scored = preference is Preference.FAST or preference.value not in routing.preferences
            elif task_type in routing.task_types:
                chain, reason, decision = (
                    routing.task_types[task_type],
                    f"classified task_type={task_type}",
                    Decision.TASK_TYPE_RULE,
                )
            elif difficulty is Difficulty.SIMPLE:
                chain, reason, decision = (
                    state.chat_models(),
                    "balanced: simple prompt -> cheapest capable model",
                    Decision.SIMPLE_CHEAPEST,
                )
                scored = True
            else:
                chain, reason, decision = self._quality_chain(state, "balanced: complex prompt -> quality")
                scored = "quality" not in routing.preferences
        budget = request.budget_used_fraction
        if budget is not None and budget >= routing.budget_cheaper_above:
            reason += f"; budget {budget:.0%} used -> cheapest first"
            decision = Decision.BUDGET
        admitted_notes: list[str] = []
        order = None
        if scored or decision is Decision.BUDGET:
            order = self._score_key(state, preference, decision)
        main = self._candidates(state, request, chain, admitted_notes, order)
        # Every automatic plan ends in the default chain (unscored: the operator's order).
        rest = [m for m in routing.default_chain if m not in chain]
        tail = self._candidates(state, request, rest, admitted_notes)
        targets = await self._breakers(state, [*main, *tail], admitted_notes)
        if not targets:
            raise FailedPrecondition(
                f"no model can serve this request ({reason}): {'; '.join(admitted_notes)}"
            )
        if (
            classification is None
            and difficulty is None
            and request.prompt.strip()
            and decision
            in (
                Decision.COMPLEX_QUALITY,
                Decision.BUDGET,
            )
        ):
            notes.append("prompt not classified: treated as complex")
        if classification is not None:
            confidence_shown = f"{classification.confidence:.2f}"
            reason += f" (task_type={task_type}, difficulty={difficulty}, confidence={confidence_shown})"
        return Plan(
            targets,
            _joined(reason, notes + admitted_notes),
            decision,
            task_type,
            difficulty,
            confidence,
            classify_seconds,
        )

    def _preference_chain(
        self, state: RoutingState, preference: Preference
    ) -> tuple[list[str], str, Decision]:
        configured = state.config.routing.preferences.get(preference.value)
        if preference is Preference.QUALITY:
            chain, reason, _ = self._quality_chain(state, "model_preference=quality")
            return chain, reason, Decision.PREFERENCE
        if configured is not None:
            return list(configured), f"model_preference={preference.value}", Decision.PREFERENCE
        return state.chat_models(), f"model_preference={preference.value} (scored)", Decision.PREFERENCE

    def _quality_chain(self, state: RoutingState, reason: str) -> tuple[list[str], str, Decision]:
        configured = state.config.routing.preferences.get("quality")
        if configured is not None:
            return list(configured), f"{reason} chain", Decision.COMPLEX_QUALITY
        return state.chat_models(), f"{reason} (best first)", Decision.COMPLEX_QUALITY

    async def _classify(self, state: RoutingState, request: Request) -> tuple[Classification | None, float]:
        if state.classifier is None or not request.prompt.strip():
            return None, 0.0
        embedding = request.embedding
        if not embedding:
            # Embedding here costs far more than the rest of a Route: only when the plan depends on it.
            decided = (request.preference or Preference.BALANCED) is not Preference.BALANCED or (
                request.task_type in state.config.routing.task_types
            )
            if self._embed is None or decided:
                return None, 0.0
            embedding = await self._embed(request.prompt)
            if embedding is None:
                return None, 0.0
        if len(embedding) != EMBEDDING_DIMENSIONS:
            raise InvalidArgument(
                "prompt_embedding",
                f"must have {EMBEDDING_DIMENSIONS} values (all-MiniLM-L6-v2), got {len(embedding)}",
            )
        started = time.perf_counter()
        classification = state.classifier.classify(_unit(embedding), request.prompt, request.context)
        return classification, time.perf_counter() - started

    def _candidates(
        self,
        state: RoutingState,
        request: Request,
        chain: Sequence[str],
        notes: list[str],
        order=None,
    ) -> list[str]:
        """Filters and flags over one chain (each skipped model noted), then scoring when `order` is set."""
        candidates = [m for m in unique(chain) if self._fits(state, request, m, notes)]
        if order is not None:
            candidates.sort(key=order)
        return candidates

    async def _breakers(
        self, state: RoutingState, model_ids: Sequence[str], notes: list[str]
    ) -> tuple[RouteTarget, ...]:
        """Health over the ordered candidates: closed targets stay; a target whose cool-down is over is
        probed only where it would be tried first (before any closed one), so its probe is real; the
        others are skipped while something can serve, else kept (and said so)."""
        usable: list[RouteTarget] = []
        skipped: list[RouteTarget] = []
        for model_id in model_ids:
            target = state.rules.target(model_id)
            view = self._view(target)
            if view.state is CircuitState.CLOSED:
                usable.append(target)
            elif not usable and await self._claims_probe(state, target, view):
                usable.append(target)
                notes.append(f"circuit half-open: probing {model_id}")
            else:
                skipped.append(target)
        if skipped:
            names = ", ".join(t.model_id for t in skipped)
            if usable:
                notes.append(f"circuit open: skipped {names}")
            else:
                notes.append(f"circuit open: {names} kept (nothing else can serve)")
        return tuple(usable or skipped)

    def _fits(self, state: RoutingState, request: Request, model_id: str, notes: list[str]) -> bool:
        model = state.config.models[model_id]
        profile = state.profile(model_id)
        problem = None
        if not model.enabled:
            problem = "disabled"
        elif request.estimated_tokens and model.context_window < request.estimated_tokens:
            problem = f"context window {model.context_window} < {request.estimated_tokens} tokens"
        elif request.uses_tools and profile.tools is False:
            problem = "no tools"
        elif request.uses_response_format and profile.response_format is False:
            problem = "no response_format"
        elif not state.flags.model_enabled(model_id, request.tenant_id, request.tenant_tier or None):
            problem = "flag off for this tenant"
        if problem:
            notes.append(f"skipped {model_id} ({problem})")
        return problem is None

    def _score_key(self, state: RoutingState, preference: Preference, decision: Decision):
        def latency(model_id: str) -> float:
            view = self._view(state.rules.target(model_id))
            return view.p50_latency_ms or float("inf")

        if decision in (Decision.BUDGET, Decision.SIMPLE_CHEAPEST):
            return lambda m: (state.cost_per_mtok(m), -state.profile(m).quality)
        if preference is Preference.FAST:
            return lambda m: (latency(m), state.cost_per_mtok(m))
        if preference is Preference.CODE:
            return lambda m: (not state.profile(m).code, -state.profile(m).quality, state.cost_per_mtok(m))
        return lambda m: (-state.profile(m).quality, state.cost_per_mtok(m))

    def _view(self, target: RouteTarget) -> BreakerView:
        return self._health.view((target.provider, target.model_id)) if self._health else BreakerView()

    async def _claims_probe(self, state: RoutingState, target: RouteTarget, view: BreakerView) -> bool:
        if view.state is CircuitState.OPEN and time.monotonic() < view.cooldown_ends:
            return False
        # Cool-down over, or half-open: one of the few probes, claimed atomically across replicas. Its
        # outcome comes within the provider's timeout (plus the report's way) or never will.
        provider = state.config.providers.get(target.provider)
        lease = provider.timeout_seconds + PROBE_REPORT_SLACK_SECONDS if provider else None
        return await self._health.claim_probe((target.provider, target.model_id), lease)


def _unit(embedding: Sequence[float]) -> np.ndarray:
    """The embedding L2-normalised, as MiniLM's are and the classifier expects: a caller's vector of
    huge (or tiny) finite values would otherwise overflow the similarities into NaN confidences. Scaled
    by its largest value first, so the norm itself cannot overflow or underflow; all zeros stay zeros."""
    vector = np.asarray(embedding, dtype=np.float64)
    largest = float(np.abs(vector).max(initial=0.0))
    if not largest:
        return vector
    vector = vector / largest
    return vector / np.linalg.norm(vector)


def _joined(reason: str, notes: list[str]) -> str:
    return f"{reason}; {'; '.join(notes)}" if notes else reason
