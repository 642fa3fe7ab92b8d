"""Rule-based routing: turns what a request asks for into an ordered list of models to try.

Shared by the Router (which serves it) and the Gateway (which falls back to it when the Router cannot
answer), so both always agree on the plan.

Plain Python over the validated config (the `models` and `routing` sections), so every rule is testable
without gRPC. Precedence:

- an embedding request gets the model it names, or else `routing.default_embedding_model`;
- an explicit chat model gets that model, then its `routing.fallback_map` entries;
- "auto" (or no model) gets the `routing.task_types` rule for its task type, else the
  `routing.preferences` chain for its preference ("balanced" when unspecified), else the default chain;
  the default chain is then appended, so an automatic plan always ends in it.

Disabled models and models whose context window is smaller than the estimated tokens are then skipped;
a plan with nothing left is refused rather than returned empty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from libs.config import Config
from libs.errors import FailedPrecondition, InvalidArgument, NotFound, shown

AUTO = "auto"
Kind = Literal["chat", "embedding"]
Preference = Literal["fast", "quality", "code", "balanced"]


@dataclass(frozen=True)
class RouteQuery:
    # A model id, or "auto" / empty to let the rules choose.
    model: str = ""
    kind: Kind = "chat"
    task_type: str = ""
    # None when the caller expressed no preference: "balanced" applies if it is configured.
    preference: Preference | None = None
    # Prompt plus completion; 0 means unknown and filters nothing.
    estimated_tokens: int = 0


@dataclass(frozen=True)
class RouteTarget:
    model_id: str
    provider: str
    provider_model: str


@dataclass(frozen=True)
class RoutePlan:
    targets: tuple[RouteTarget, ...]
    # Which rule decided, plus any rule that was asked for but absent and any model skipped.
    reason: str


class RoutingRules:
    """One immutable snapshot of the routing config; a reload builds a new one instead of mutating."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def route(self, query: RouteQuery) -> RoutePlan:
        if query.estimated_tokens < 0:
            raise InvalidArgument("estimated_tokens", "must not be negative")
        explicit = query.model not in ("", AUTO)
        if query.kind == "embedding":
            chain, reason = self._embedding_chain(query.model if explicit else "")
        elif explicit:
            chain, reason = self._explicit_chain(query.model)
        else:
            chain, reason = self._automatic_chain(query)
        return self._plan(chain, reason, query.estimated_tokens)

    def _checked(self, model_id: str, kind: Kind) -> str:
        model = self.config.models.get(model_id)
        if model is None:
            raise NotFound(f"model: unknown model {shown(model_id)}")
        if model.kind != kind:
            raise InvalidArgument(
                "model", f"{shown(model_id)} is a {model.kind} model; this request needs a {kind} model"
            )
        return model_id

    def _embedding_chain(self, model_id: str) -> tuple[list[str], str]:
        if model_id:
            return [self._checked(model_id, "embedding")], f"explicit model {model_id}"
        default = self.config.routing.default_embedding_model
        return [default], f"default embedding model {default}"

    def _explicit_chain(self, model_id: str) -> tuple[list[str], str]:
        fallbacks = self.config.routing.fallback_map.get(self._checked(model_id, "chat"), [])
        return _unique([model_id, *fallbacks]), f"explicit model {model_id}"

    def _automatic_chain(self, query: RouteQuery) -> tuple[list[str], str]:
        routing = self.config.routing
        # Rules the caller asked for that the config lacks: the reason says so, so a typo is visible.
        missing: list[str] = []
        chain: list[str] | None = None
        reason = "default chain"
        if query.task_type:
            chain = routing.task_types.get(query.task_type)
            if chain is None:
                missing.append(f"task_type {shown(query.task_type)} has no rule")
            else:
                reason = f"task_type={query.task_type}"
        if chain is None:
            preference = query.preference or "balanced"
            chain = routing.preferences.get(preference)
            if chain is not None:
                reason = f"model_preference={preference}"
            elif query.preference is not None:
                missing.append(f"model_preference={preference} has no rule")
        if missing:
            reason += f" ({'; '.join(missing)})"
        return _unique([*(chain or []), *routing.default_chain]), reason

    def _plan(self, chain: list[str], reason: str, estimated_tokens: int) -> RoutePlan:
        targets: list[RouteTarget] = []
        skipped: list[str] = []
        for model_id in chain:
            model = self.config.models[model_id]
            if not model.enabled:
                skipped.append(f"{model_id} (disabled)")
            elif estimated_tokens and model.context_window < estimated_tokens:
                skipped.append(
                    f"{model_id} (context window {model.context_window} < {estimated_tokens} tokens)"
                )
            else:
                targets.append(RouteTarget(model_id, model.provider, self.config.provider_model(model_id)))
        if not targets:
            wanted = "no enabled model"
            if estimated_tokens:
                wanted += f" with a context window of at least {estimated_tokens} tokens"
            raise FailedPrecondition(f"{wanted} in the plan from {reason}: skipped {', '.join(skipped)}")
        if skipped:
            reason += f"; skipped {', '.join(skipped)}"
        return RoutePlan(tuple(targets), reason)


def _unique(model_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(model_ids))
