"""The static plans both sides agree on: what the Gateway routes by when the Router cannot answer, and the
Router's own plans for explicit models and embeddings.

- an embedding request gets the model it names, or else `routing.default_embedding_model`;
- an explicit chat model gets that model, then its `routing.fallback_map` entries;
- "auto" (or no model) gets `routing.default_chain` (the Router does better: services/router/router.py).

Disabled models and models whose context window is smaller than the estimated tokens are skipped; a
plan with nothing left is refused rather than returned empty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from libs.config import Config
from libs.errors import FailedPrecondition, InvalidArgument, NotFound, shown

AUTO = "auto"
Kind = Literal["chat", "embedding"]


@dataclass(frozen=True)
class RouteQuery:
    # A model id, or "auto" / empty for the default chain.
    model: str = ""
    kind: Kind = "chat"
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
    # Which rule decided, plus any model skipped.
    reason: str


def is_explicit(model: str) -> bool:
    return model not in ("", AUTO)


class RoutingRules:
    """One immutable snapshot of the routing config; a reload builds a new one instead of mutating."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def route(self, query: RouteQuery) -> RoutePlan:
        if query.estimated_tokens < 0:
            raise InvalidArgument("estimated_tokens", "must not be negative")
        if query.kind == "embedding":
            chain, reason = self.embedding_chain(query.model if is_explicit(query.model) else "")
        elif is_explicit(query.model):
            chain, reason = self.explicit_chain(query.model)
        else:
            chain, reason = list(self.config.routing.default_chain), "default chain"
        return self.plan(chain, reason, query.estimated_tokens)

    def checked(self, model_id: str, kind: Kind) -> str:
        model = self.config.models.get(model_id)
        if model is None:
            raise NotFound(f"model: unknown model {shown(model_id)}")
        if model.kind != kind:
            raise InvalidArgument(
                "model", f"{shown(model_id)} is a {model.kind} model; this request needs a {kind} model"
            )
        return model_id

    def embedding_chain(self, model_id: str) -> tuple[list[str], str]:
        if model_id:
            return [self.checked(model_id, "embedding")], f"explicit model {model_id}"
        default = self.config.routing.default_embedding_model
        return [default], f"default embedding model {default}"

    def explicit_chain(self, model_id: str) -> tuple[list[str], str]:
        fallbacks = self.config.routing.fallback_map.get(self.checked(model_id, "chat"), [])
        return unique([model_id, *fallbacks]), f"explicit model {model_id}"

    def target(self, model_id: str) -> RouteTarget:
        return RouteTarget(
            model_id, self.config.models[model_id].provider, self.config.provider_model(model_id)
        )

    def plan(self, chain: list[str], reason: str, estimated_tokens: int) -> RoutePlan:
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
                targets.append(self.target(model_id))
        if not targets:
            wanted = "no enabled model"
            if estimated_tokens:
                wanted += f" with a context window of at least {estimated_tokens} tokens"
            raise FailedPrecondition(f"{wanted} in the plan from {reason}: skipped {', '.join(skipped)}")
        if skipped:
            reason += f"; skipped {', '.join(skipped)}"
        return RoutePlan(tuple(targets), reason)


def unique(model_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(model_ids))
