"""One request end to end, in the order of ARCHITECTURE.md's request flow.

Chat: admit (rate limits) → budget → cache lookup → route → try targets → report outcomes → respond;
then, off the response path: record usage (or spool it), charge tokens, store the answer in the cache.
Embeddings take the same door (limits, budget, usage) without the cache and the router.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from sophia.cache.v1 import cache_pb2_grpc
from sophia.ledger.v1 import ledger_pb2 as ledger_pb
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.background import Background
from libs.config import Config
from libs.errors import ResourceExhausted, Unavailable
from libs.pricing import PriceTable
from services.gateway import metrics
from services.gateway.access import AccessControl
from services.gateway.caching import CachedAnswer, CacheKey, ResponseCache
from services.gateway.domain import ChatRequest, Completion, CompletionChunk, Principal, Target
from services.gateway.pipeline import Attempt, ChatExecutor, provider_failure
from services.gateway.providers.base import Provider, ProviderError
from services.gateway.routing import Routing
from services.gateway.usage import UsageRecord, UsageRecorder

log = logging.getLogger(__name__)

BUDGET_TIMEOUT_SECONDS = 0.3
# A tenant found within budget is not asked about again for this long: one ledger call per tenant per
# second instead of one per request, at the price of overshooting a hard stop by at most that second.
BUDGET_RECHECK_SECONDS = 1.0
# Roughly four characters a token: enough for limits and for skipping models whose window is too small.
CHARS_PER_TOKEN = 4
DEFAULT_COMPLETION_ESTIMATE = 256
CACHEABLE_FINISHES = ("stop", "length")


def estimated_tokens(request: ChatRequest) -> int:
    prompt = sum(len(m.content) for m in request.messages) // CHARS_PER_TOKEN
    return prompt + (request.max_tokens or DEFAULT_COMPLETION_ESTIMATE)


@dataclass
class ChatOutcome:
    """What answered, for the response headers."""

    model_id: str
    provider: str
    attempts: int
    cache: str  # hit | miss | bypass
    cost_micros: int = 0


@dataclass
class _Prepared:
    cache_key: CacheKey | None
    cache_status: str
    answer: CachedAnswer | None  # set on a cache hit
    targets: list[Target]  # the route, when there was no hit


@dataclass
class ChatStream:
    first: CompletionChunk
    rest: AsyncIterator[CompletionChunk]
    outcome: ChatOutcome


class RequestFlow:
    def __init__(
        self,
        config: Config,
        access: AccessControl,
        routing: Routing,
        executor: ChatExecutor,
        providers: dict[str, Provider],
        cache: ResponseCache,
        ledger: ledger_pb2_grpc.LedgerServiceStub,
        usage: UsageRecorder,
        background: Background,
    ) -> None:
        self._config = config
        self._access = access
        self._routing = routing
        self._executor = executor
        self._providers = providers
        self._cache = cache
        self._ledger = ledger
        self._usage = usage
        self._background = background
        self._prices = PriceTable(config.ledger.prices)
        self._within_budget_until: dict[str, float] = {}

    @classmethod
    def build(cls, config, access, routing, providers, channels, usage, background) -> RequestFlow:
        cache = ResponseCache(
            cache_pb2_grpc.CacheServiceStub(channels["cache"]), config.cache, config.gateway.cache_enabled
        )
        ledger = ledger_pb2_grpc.LedgerServiceStub(channels["ledger"])
        return cls(
            config, access, routing, ChatExecutor(providers), providers, cache, ledger, usage, background
        )

    async def _check_budget(self, tenant_id: str) -> None:
        if self._within_budget_until.get(tenant_id, 0.0) > time.monotonic():
            return
        try:
            reply = await self._ledger.CheckBudget(
                ledger_pb.CheckBudgetRequest(tenant_id=tenant_id), timeout=BUDGET_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if self._config.gateway.budget_fail_open:
                log.warning("budget not checked, ledger unavailable (%s): failing open", exc.code().name)
                self._within_budget_until[tenant_id] = time.monotonic() + BUDGET_RECHECK_SECONDS
                return
            raise Unavailable("budget could not be checked: the ledger is unavailable") from None
        if reply.allowed:
            self._within_budget_until[tenant_id] = time.monotonic() + BUDGET_RECHECK_SECONDS
            return
        raise ResourceExhausted(
            f"budget exhausted: tenant {tenant_id} has spent ${reply.spent_micros / 1e6:.2f} "
            f"of its ${reply.limit_micros / 1e6:.2f} monthly budget"
        )

    async def _prepare(self, principal: Principal, request: ChatRequest, request_id: str) -> _Prepared:
        """Limits, budget and cache, in that order; the route only when the cache has no answer."""
        estimate = estimated_tokens(request)
        await self._access.admit(principal, estimate)
        await self._check_budget(principal.tenant_id)
        cache_key = self._cache.key(principal.tenant_id, request)
        cache_status, answer = await self._cache.lookup(cache_key)
        if answer is not None:
            return _Prepared(cache_key, cache_status, answer, [])
        plan = await self._routing.plan(request, principal.tenant_id, request_id, estimate)
        return _Prepared(cache_key, cache_status, None, self._executor.usable_targets(plan, request))

    def _settle(
        self,
        principal: Principal,
        cache_key: CacheKey | None,
        request_id: str,
        outcome: ChatOutcome,
        completion: Completion,
        *,
        cacheable: bool = True,
    ) -> None:
        """Prices the answer now (for the response header), then records and caches it in the background."""
        cached = outcome.cache == "hit"
        outcome.cost_micros = self._prices.cost_micros(
            outcome.model_id, completion.prompt_tokens, completion.completion_tokens, cached=cached
        )
        labels = {"model": outcome.model_id, "provider": outcome.provider}
        metrics.tokens.add(completion.prompt_tokens, {**labels, "direction": "input"})
        metrics.tokens.add(completion.completion_tokens, {**labels, "direction": "output"})
        metrics.cost.add(outcome.cost_micros, labels)
        metrics.cache_results.add(1, {"result": outcome.cache})
        record = UsageRecord(
            request_id=request_id,
            tenant_id=principal.tenant_id,
            api_key_id=principal.key_id,
            model_id=outcome.model_id,
            provider=outcome.provider,
            input_tokens=completion.prompt_tokens,
            output_tokens=completion.completion_tokens,
            cached=cached,
            occurred_at=time.time(),
        )
        self._background.spawn(self._usage.record(record))
        self._background.spawn(
            self._access.charge(principal, completion.prompt_tokens + completion.completion_tokens)
        )
        if (
            cacheable
            and cache_key is not None
            and outcome.cache == "miss"
            and completion.finish_reason in CACHEABLE_FINISHES
        ):
            answer = CachedAnswer(outcome.model_id, outcome.provider, completion)
            self._background.spawn(self._cache.store(cache_key, answer))

    async def embed(
        self, principal: Principal, target: Target, inputs: list[str], request_id: str
    ) -> tuple[list[list[float]], int]:
        await self._access.admit(principal, sum(len(text) for text in inputs) // CHARS_PER_TOKEN)
        await self._check_budget(principal.tenant_id)
        try:
            vectors, tokens = await self._providers[target.provider].embed(target, inputs)
        except ProviderError as error:
            raise provider_failure(error, []) from None
        outcome = ChatOutcome(target.model_id, target.provider, 1, "bypass")
        usage = Completion(text="", finish_reason="stop", prompt_tokens=tokens, completion_tokens=0)
        self._settle(principal, None, request_id, outcome, usage, cacheable=False)
        return vectors, tokens

    async def complete(
        self, principal: Principal, request: ChatRequest, request_id: str
    ) -> tuple[Completion, ChatOutcome]:
        prepared = await self._prepare(principal, request, request_id)
        if prepared.answer is not None:
            outcome = ChatOutcome(prepared.answer.model_id, prepared.answer.provider, 0, "hit")
            self._settle(principal, prepared.cache_key, request_id, outcome, prepared.answer.completion)
            return prepared.answer.completion, outcome
        attempts: list[Attempt] = []
        try:
            completion, served = await self._executor.complete(prepared.targets, request, attempts)
        finally:
            self._routing.report(attempts, self._background)
        outcome = ChatOutcome(
            served.target.model_id, served.target.provider, len(served.attempts), prepared.cache_status
        )
        self._settle(principal, prepared.cache_key, request_id, outcome, completion)
        return completion, outcome

    async def stream(self, principal: Principal, request: ChatRequest, request_id: str) -> ChatStream:
        prepared = await self._prepare(principal, request, request_id)
        if prepared.answer is not None:
            whole = prepared.answer.completion
            outcome = ChatOutcome(prepared.answer.model_id, prepared.answer.provider, 0, "hit")
            self._settle(principal, prepared.cache_key, request_id, outcome, whole)
            first = CompletionChunk(
                text=whole.text,
                finish_reason=whole.finish_reason,
                prompt_tokens=whole.prompt_tokens,
                completion_tokens=whole.completion_tokens,
                tool_calls=whole.tool_calls,
            )
            return ChatStream(first, _nothing(), outcome)
        attempts: list[Attempt] = []
        try:
            first, rest, served = await self._executor.stream(prepared.targets, request, attempts)
        finally:
            self._routing.report(attempts, self._background)
        outcome = ChatOutcome(
            served.target.model_id, served.target.provider, len(served.attempts), prepared.cache_status
        )
        settled = self._settled_stream(principal, prepared.cache_key, request_id, outcome, first, rest)
        return ChatStream(first, settled, outcome)

    async def _settled_stream(self, principal, cache_key, request_id, outcome, first, rest):
        """Passes the chunks through, then records what the stream really used, however it ended."""
        text, last, saw_tool_calls = [first.text], first, bool(first.tool_calls)
        try:
            async for chunk in rest:
                text.append(chunk.text)
                saw_tool_calls = saw_tool_calls or bool(chunk.tool_calls)
                last = chunk
                yield chunk
        finally:
            completion = Completion(
                text="".join(text),
                finish_reason=last.finish_reason or "cancelled",
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
            )
            # Streamed tool calls arrive as fragments; only whole answers are worth caching.
            self._settle(principal, cache_key, request_id, outcome, completion, cacheable=not saw_tool_calls)


async def _nothing() -> AsyncIterator[CompletionChunk]:
    return
    yield
