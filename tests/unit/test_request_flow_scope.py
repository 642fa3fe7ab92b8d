"""A key limited to some models is served only by them: by the plan, its fallbacks and the cache.

RequestFlow runs for real with its collaborators replaced by small in-process stand-ins (the provider,
the Router's plan, the cache's lookup), which the mesh tests cover for real."""

from __future__ import annotations

from types import SimpleNamespace

from services.gateway.access.roles import KeyScope
from services.gateway.domain import ChatRequest, Completion, Message, Principal, Target
from services.gateway.serving.fallback import ChatExecutor
from services.gateway.serving.idempotency import Claim
from services.gateway.serving.request_flow import RequestFlow
from services.gateway.serving.response_cache import CachedAnswer, CacheLayer, CacheLookup, CacheStatus
from services.gateway.serving.router_client import Plan

SMALL = Target("small", "p", "small")
QUESTION = ChatRequest(model="auto", messages=(Message("user", "What is the capital of France?"),))


class Provider:
    def unsupported(self, request) -> None:
        return None

    async def complete(self, target, request) -> Completion:
        return Completion(f"fresh from {target.model_id}", "stop", 3, 2)


class Cache:
    """Holds the answer another key of the tenant got from "big"."""

    def key(self, tenant_id, request, *, semantic_allowed, store):
        return None

    async def lookup(self, key) -> CacheLookup:
        answer = CachedAnswer("big", "p", Completion("cached from big", "stop", 3, 2))
        return CacheLookup(CacheStatus.HIT, CacheLayer.EXACT, 1.0, answer)


class Routing:
    async def plan(self, request, *args, **kwargs) -> Plan:
        return Plan((SMALL,), "auto: small")

    def report(self, attempts, background) -> None:
        pass


class Access:
    async def admit(self, principal, estimate) -> None:
        pass

    def charge(self, principal, tokens) -> None:
        pass


class Budgets:
    async def check(self, tenant_id) -> float:
        return 0.0


class Usage:
    def __init__(self) -> None:
        self.records = []

    async def record(self, record, call_id=None) -> None:
        self.records.append(record)


class Idempotency:
    async def claim(self, tenant_id, request_id, fingerprint) -> Claim:
        return Claim(request_id, "", request_id, held=False)

    async def release(self, claim) -> None:
        pass


def flow(usage: Usage) -> RequestFlow:
    providers = {"p": Provider()}
    return RequestFlow(
        None,
        Access(),
        Routing(),
        ChatExecutor(providers),
        providers,
        Cache(),
        Budgets(),
        usage,
        SimpleNamespace(spawn=lambda coroutine: coroutine.close()),
        idempotency=Idempotency(),
        prices=SimpleNamespace(cost_micros=lambda *args, **kwargs: 0),
        flags=SimpleNamespace(enabled=lambda *args: False),
    )


async def test_a_cached_answer_from_a_model_the_key_may_not_use_is_a_miss_for_that_key():
    usage = Usage()
    limited = Principal("acme", "key_small", scope=KeyScope(models=("small",)))
    completion, outcome = await flow(usage).complete(limited, QUESTION, "r1")
    assert (outcome.model_id, outcome.cache, completion.text) == ("small", "miss", "fresh from small")
    assert [record.model_id for record in usage.records] == ["small"]


async def test_a_key_without_limits_gets_the_cached_answer():
    _completion, outcome = await flow(Usage()).complete(Principal("acme", "key_any"), QUESTION, "r2")
    assert (outcome.model_id, outcome.cache) == ("big", "hit")
