"""One request end to end, in the order of the request flow in docs/architecture.md.

Chat: admit (rate limits) → budget → cache lookup → route → try targets → report outcomes → respond;
then, off the response path: record usage (or spool it), charge tokens, store the answer in the cache.
Embeddings take the same door (limits, budget, usage) without the cache and the router.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from sophia.cache.v1 import cache_pb2_grpc
from sophia.ledger.v1 import ledger_pb2_grpc

from libs.background import Background
from libs.breaker import DependencyBreaker, grpc_health_probe
from libs.config import Config, ModelConfig
from libs.errors import InvalidArgument, PermissionDenied, ServiceError
from libs.feature_flags import FeatureFlags
from services.gateway import metrics
from services.gateway.access.budgets import BudgetChecks
from services.gateway.access.control import AccessControl
from services.gateway.access.rate_limits import NO_HOLD, TokenHold
from services.gateway.domain import (
    CUT_SHORT,
    ChatRequest,
    Completion,
    CompletionChunk,
    EmbeddingInputs,
    Principal,
    StreamTally,
    Target,
)
from services.gateway.providers.base import Provider, ProviderError
from services.gateway.serving.fallback import (
    CUT_BY_CLIENT,
    Attempt,
    ChatExecutor,
    Served,
    provider_failure,
)
from services.gateway.serving.idempotency import Claim, IdempotencyKeys
from services.gateway.serving.response_cache import (
    CachedAnswer,
    CacheKey,
    CacheLookup,
    CacheStatus,
    ResponseCache,
    prompt_fingerprint,
)
from services.gateway.serving.router_client import Plan, Routing
from services.gateway.usage.prices import LedgerPrices
from services.gateway.usage.recorder import LEDGER_SERVICE, UsageRecord, UsageRecorder, new_call_id

log = logging.getLogger(__name__)

CACHE_SERVICE = "sophia.cache.v1.CacheService"
CACHE_FAILURES_TO_OPEN = 3
DEFAULT_COMPLETION_ESTIMATE = 256
CACHEABLE_FINISHES = ("stop", "length")
# The Gateway's own feature flag (config/flags.yaml) for the semantic cache layer, per tenant.
SEMANTIC_CACHING = "semantic_caching"


def provider_dimensions(model_id: str, model: ModelConfig, requested: int | None) -> int | None:
    """The `dimensions` to pass the provider (None: the model's own size), or InvalidArgument when the
    model cannot return vectors of the requested size; checked before the call, so it is never billed."""
    if requested is None:
        return None
    if requested < 1:
        raise InvalidArgument("dimensions", f"must be at least 1, got {requested}")
    if model.accepts_dimensions and (not model.dimensions or requested <= model.dimensions):
        return requested
    if requested == model.dimensions:
        return None
    native = f"returns {model.dimensions} dimensions" if model.dimensions else "has a fixed size"
    raise InvalidArgument("dimensions", f"{model_id} {native}; other sizes are not supported")


@dataclass
class ChatOutcome:
    """What answered, for the response headers and the usage record."""

    model_id: str
    provider: str
    attempts: int
    cache: str  # hit | miss | bypass
    cost_micros: int = 0
    cache_layer: str = ""  # exact | semantic, on a hit
    cache_similarity: float = 0.0  # on a semantic hit
    # What the Router made of the request (empty when it did not classify), and why this plan.
    task_type: str = ""
    difficulty: str = ""
    route_reason: str = ""
    planned_model_id: str = ""  # the plan's first model; differs from model_id after a fallback
    prompt_fingerprint: str = ""


@dataclass
class _Prepared:
    cache_key: CacheKey | None
    lookup: CacheLookup
    targets: list[Target]  # the route, when there was no hit
    plan: Plan | None = None
    prompt_fingerprint: str = ""
    # The request's estimate held against its key's tokens per minute, ended by its charge or its failure.
    hold: TokenHold = NO_HOLD
    prompt_estimate: int = 0  # tokens, for a stream cut before its usage arrives

    @property
    def answer(self) -> CachedAnswer | None:
        return self.lookup.answer

    def outcome(self, target: Target, attempts: int) -> ChatOutcome:
        """The outcome of an answer from `target` (a provider) or, with no plan, from the cache."""
        plan = self.plan
        return ChatOutcome(
            target.model_id,
            target.provider,
            attempts,
            self.lookup.status.value,
            cache_layer=self.lookup.layer.value if self.lookup.layer else "",
            cache_similarity=self.lookup.similarity,
            task_type=plan.task_type if plan else "",
            difficulty=plan.difficulty if plan else "",
            route_reason=plan.reason if plan else "",
            planned_model_id=plan.targets[0].model_id if plan and plan.targets else "",
            prompt_fingerprint=self.prompt_fingerprint,
        )

    def cached_outcome(self) -> ChatOutcome:
        answer = self.lookup.answer
        assert answer is not None
        return self.outcome(Target(answer.model_id, answer.provider, ""), 0)


class _CallStandIn:
    """A unary call's stand-in record: its prompt's estimate, journaled the moment its request has gone to
    a provider when the Gateway has nothing else in flight (`UsageRecorder.stand_in_now`), so that its
    sync runs while the provider works and the call's own record, written over it, waits for none."""

    __slots__ = ("_prepared", "_principal", "_request_id", "_usage", "call_id", "written")

    def __init__(
        self, usage: UsageRecorder, principal: Principal, request_id: str, prepared: _Prepared
    ) -> None:
        self.call_id = new_call_id()
        self.written = False
        self._usage, self._principal = usage, principal
        self._request_id, self._prepared = request_id, prepared

    def on_sent(self, target: Target) -> None:
        if not self.written:  # else a fallback's send: the first stand-in answers for the call meanwhile
            self.written = self._usage.stand_in_now(self.call_id, lambda: self._record(target))

    def _record(self, target: Target) -> UsageRecord:
        prompt = Completion("", CUT_SHORT, self._prepared.prompt_estimate, 0)
        return usage_record(self._principal, self._request_id, self._prepared.outcome(target, 1), prompt)

    def withdraw(self) -> None:
        """The call ended with nothing to bill."""
        if self.written:
            self._usage.withdraw(self.call_id)


@dataclass
class ChatStream:
    first: CompletionChunk
    rest: SettledStream | _ReplayedChunks
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
        budgets: BudgetChecks,
        usage: UsageRecorder,
        background: Background,
        *,
        idempotency: IdempotencyKeys,
        prices: LedgerPrices,
        flags: FeatureFlags,
    ) -> None:
        self._config = config
        self._access = access
        self._routing = routing
        self._executor = executor
        self._providers = providers
        self._cache = cache
        self._budgets = budgets
        self._usage = usage
        self._background = background
        self._prices = prices
        self._flags = flags
        self._idempotency = idempotency

    @classmethod
    def build(
        cls, config, access, routing, providers, channels, usage, background, idempotency, prices, flags
    ) -> RequestFlow:
        cache = ResponseCache(
            cache_pb2_grpc.CacheServiceStub(channels["cache"]),
            config.cache,
            config.gateway.cache_enabled,
            DependencyBreaker(
                "cache (bypassed)",
                grpc_health_probe(channels["cache"], CACHE_SERVICE),
                # One slow lookup on a busy cache is not an outage; three in a row are.
                failure_threshold=CACHE_FAILURES_TO_OPEN,
            ),
        )
        budget_mode = "failing open" if config.gateway.budget_fail_open else "failing closed"
        budgets = BudgetChecks(
            ledger_pb2_grpc.LedgerServiceStub(channels["ledger"]),
            DependencyBreaker(
                f"ledger (budgets not checked: {budget_mode})",
                grpc_health_probe(channels["ledger"], LEDGER_SERVICE),
            ),
            fail_open=config.gateway.budget_fail_open,
        )
        return cls(
            config,
            access,
            routing,
            ChatExecutor(providers),
            providers,
            cache,
            budgets,
            usage,
            background,
            idempotency=idempotency,
            prices=prices,
            flags=flags,
        )

    async def close(self) -> None:
        """Stops the breakers' probes and the idempotency leases' renewal."""
        await self._cache.close()
        await self._budgets.close()
        await self._idempotency.close()

    async def _prepare(self, principal: Principal, request: ChatRequest, request_id: str) -> _Prepared:
        """Limits, budget and cache, in that order; the route only when the cache has no answer. The
        caller ends the prepared request's token hold if it fails before the charge."""
        # For limits and for skipping models whose context window is too small; a cut stream's prompt.
        prompt_estimate = request.estimated_prompt_tokens()
        estimate = prompt_estimate + (request.max_tokens or DEFAULT_COMPLETION_ESTIMATE)
        hold = await self._access.admit(principal, estimate)
        try:
            prepared = await self._budget_cache_route(principal, request, request_id, estimate)
        except BaseException:
            hold.end()
            raise
        prepared.hold, prepared.prompt_estimate = hold, prompt_estimate
        return prepared

    async def _budget_cache_route(
        self, principal: Principal, request: ChatRequest, request_id: str, estimate: int
    ) -> _Prepared:
        budget_used = await self._budgets.check(principal.tenant_id)
        cache_key = self._cache.key(
            principal.tenant_id,
            request,
            semantic_allowed=self._flags.enabled(SEMANTIC_CACHING, principal.tenant_id),
            store=request.store_in_cache,
        )
        found = await self._cache.lookup(cache_key)
        fingerprint = prompt_fingerprint(request, cache_key)
        if found.answer is not None:
            answered_by = found.answer.model_id
            if principal.scope.allows_model(answered_by) and self._flags.model_enabled(
                answered_by, principal.tenant_id
            ):
                return _Prepared(cache_key, found, [], prompt_fingerprint=fingerprint)
            # Another key of the tenant got it from a model this key may not use, or one whose flag is now
            # off for the tenant (switched off, its answers must stop too): a miss.
            found = CacheLookup(CacheStatus.MISS, embedding=found.embedding)
        plan = await self._routing.plan(
            request,
            principal.tenant_id,
            request_id,
            estimate,
            embedding=found.embedding or None,  # embedded once: the cache's vector serves the Router
            budget_used_fraction=budget_used,
            tenant_tier=self._flags.tier_of(principal.tenant_id),
        )
        targets = self._executor.usable_targets(plan, request)
        if principal.scope.models:
            # An explicit model's fallbacks too: a key limited to some models is never served (and
            # billed) by another one.
            targets = _within_scope(principal, targets)
        return _Prepared(cache_key, found, targets, plan, fingerprint)

    async def _settle(
        self,
        principal: Principal,
        cache_key: CacheKey | None,
        request_id: str,
        outcome: ChatOutcome,
        completion: Completion,
        *,
        cacheable: bool = True,
        operation: str = "chat",
        call_id: str | None = None,
        hold: TokenHold = NO_HOLD,
        stand_in: _CallStandIn | None = None,
    ) -> None:
        """Prices the answer (for the response header) and makes its usage record durable (or its call's
        `stand_in`, which the record then replaces); the ledger, the tokens-per-minute charge and the cache
        store follow in the background."""
        cached = outcome.cache == "hit"
        outcome.cost_micros = self._prices.cost_micros(
            outcome.model_id, completion.prompt_tokens, completion.completion_tokens, cached=cached
        )
        labels = {"model": outcome.model_id, "provider": outcome.provider, "tenant": principal.tenant_id}
        metrics.tokens.add(completion.prompt_tokens, {**labels, "direction": "input"})
        metrics.tokens.add(completion.completion_tokens, {**labels, "direction": "output"})
        metrics.cost.add(outcome.cost_micros, labels)
        metrics.cache_results.add(1, {"result": outcome.cache, "layer": outcome.cache_layer or "none"})
        if not cached:  # a cache hit used no provider tokens
            metrics.answer_tokens(
                outcome.provider,
                outcome.model_id,
                completion.prompt_tokens,
                completion.completion_tokens,
                operation,
            )
        record = usage_record(principal, request_id, outcome, completion)
        # Charged first: a client that goes away while its record is written has still used the tokens.
        self._access.charge(principal, completion.prompt_tokens + completion.completion_tokens, hold)
        if stand_in is not None:
            call_id = stand_in.call_id
        over_stand_in = stand_in is not None and stand_in.written
        # Durable (or its stand-in is) before the answer is complete.
        await self._usage.record(record, call_id, over_stand_in=over_stand_in)
        if (
            cacheable
            and cache_key is not None
            and outcome.cache == "miss"
            and completion.finish_reason in CACHEABLE_FINISHES
            # Tool calls carry ids the client answers by; some providers end them with "stop".
            and not completion.tool_calls
        ):
            answer = CachedAnswer(outcome.model_id, outcome.provider, completion)
            self._background.spawn(self._cache.store(cache_key, answer))

    async def embed(
        self,
        principal: Principal,
        target: Target,
        inputs: EmbeddingInputs,
        request_id: str,
        dimensions: int | None = None,
    ) -> tuple[list[list[float]], int, ChatOutcome]:
        model = self._config.models[target.model_id]
        passed_dimensions = provider_dimensions(target.model_id, model, dimensions)
        if inputs.token_arrays and not model.accepts_token_input:
            raise InvalidArgument(
                "token_arrays" if inputs.typed else "input",
                f"{target.model_id} embeds text, not token ids; send strings (LangChain: "
                "OpenAIEmbeddings(check_embedding_ctx_length=False))",
            )
        hold = await self._access.admit(principal, inputs.estimated_tokens())
        try:
            await self._budgets.check(principal.tenant_id)
            vectors, tokens = await self._embed(target, inputs, passed_dimensions)
            outcome = ChatOutcome(target.model_id, target.provider, 1, "bypass")
            usage = Completion(text="", finish_reason="stop", prompt_tokens=tokens, completion_tokens=0)
            await self._settle(
                principal,
                None,
                request_id,
                outcome,
                usage,
                cacheable=False,
                operation="embeddings",
                hold=hold,
            )
        except BaseException:
            hold.end()
            raise
        return vectors, tokens, outcome

    async def _embed(
        self, target: Target, inputs: EmbeddingInputs, dimensions: int | None
    ) -> tuple[list[list[float]], int]:
        started = time.perf_counter()
        try:
            vectors, tokens = await self._providers[target.provider].embed(
                target, inputs.provider_input(), dimensions
            )
        except ProviderError as error:
            elapsed = time.perf_counter() - started
            metrics.provider_call(target.provider, target.model_id, elapsed, error.kind, "embeddings")
            raise provider_failure(error, []) from None
        elapsed = time.perf_counter() - started
        metrics.provider_call(target.provider, target.model_id, elapsed, operation="embeddings")
        return vectors, tokens

    async def complete(
        self,
        principal: Principal,
        request: ChatRequest,
        request_id: str,
        fingerprint: str | None = None,
    ) -> tuple[Completion, ChatOutcome]:
        """`fingerprint`: the request's, when the client chose the request id (see idempotency.py)."""
        claim = await self._idempotency.claim(principal.tenant_id, request_id, fingerprint)
        if claim.answer is not None:
            return _replayed(claim.answer)  # answered before: not run, not counted again
        try:
            completion, outcome = await self._complete(principal, request, claim.record_request_id)
        except BaseException:
            await self._idempotency.release(claim)
            raise
        await self._keep_answer(claim, completion, outcome)
        return completion, outcome

    async def _keep_answer(self, claim: Claim, completion: Completion, outcome: ChatOutcome) -> None:
        """Keeps the answer for retries when the client chose the request id (nothing to keep otherwise:
        the answer is not even converted)."""
        if claim.held:
            await self._idempotency.complete(claim, _answer(completion, outcome))

    async def _complete(
        self, principal: Principal, request: ChatRequest, request_id: str
    ) -> tuple[Completion, ChatOutcome]:
        prepared = await self._prepare(principal, request, request_id)
        try:
            return await self._serve(principal, request, request_id, prepared)
        except BaseException:
            prepared.hold.end()  # failed before its charge (which ends it too)
            raise

    async def _serve(
        self, principal: Principal, request: ChatRequest, request_id: str, prepared: _Prepared
    ) -> tuple[Completion, ChatOutcome]:
        if prepared.answer is not None:
            outcome = prepared.cached_outcome()
            completion = prepared.answer.completion
            await self._settle(
                principal, prepared.cache_key, request_id, outcome, completion, hold=prepared.hold
            )
            return completion, outcome
        attempts: list[Attempt] = []
        stand_in = _CallStandIn(self._usage, principal, request_id, prepared)
        answering = asyncio.ensure_future(
            self._executor.complete(prepared.targets, request, attempts, stand_in.on_sent)
        )
        try:
            completion, served = await asyncio.shield(answering)
        except asyncio.CancelledError:
            # The client went away while a provider answers: the provider bills that call all the same, so
            # its answer is awaited (within the request's deadline) and recorded and charged like any other.
            self._background.spawn(
                self._settle_unheard(principal, request_id, prepared, answering, attempts, stand_in)
            )
            raise
        except BaseException:
            self._routing.report(attempts, self._background)
            self._bill_cut_call(principal, request_id, prepared, attempts, stand_in)
            raise
        self._routing.report(attempts, self._background)
        outcome = prepared.outcome(served.target, len(served.attempts))
        await self._settle(
            principal,
            prepared.cache_key,
            request_id,
            outcome,
            completion,
            hold=prepared.hold,
            stand_in=stand_in,
        )
        return completion, outcome

    def _bill_cut_call(
        self,
        principal: Principal,
        request_id: str,
        prepared: _Prepared,
        attempts: list[Attempt],
        stand_in: _CallStandIn | None = None,
    ) -> None:
        """A call its client cut short (gone, or its deadline passed) after the provider was sent it: the
        provider has read the prompt and bills it, so the tenant is billed the prompt's estimate (what it
        generated meanwhile is not known). Recorded in the background: the request may be cancelled. Any
        other failed call bills nothing: its `stand_in` is withdrawn."""
        cut = next((a for a in reversed(attempts) if a.sent and a.outcome in CUT_BY_CLIENT), None)
        if cut is None:
            if stand_in is not None:
                stand_in.withdraw()
            return
        outcome = prepared.outcome(cut.target, len(attempts))
        prompt = Completion("", CUT_SHORT, prepared.prompt_estimate, 0)
        hold = prepared.hold
        self._background.spawn(
            self._settle(
                principal, None, request_id, outcome, prompt, cacheable=False, hold=hold, stand_in=stand_in
            )
        )

    async def _settle_unheard(
        self,
        principal: Principal,
        request_id: str,
        prepared: _Prepared,
        answering: asyncio.Future[tuple[Completion, Served]],
        attempts: list[Attempt],
        stand_in: _CallStandIn,
    ) -> None:
        """Records the answer to a request whose client left before it came (nothing when none came)."""
        try:
            completion, served = await answering
        except ServiceError:
            # Its deadline passed meanwhile, or no provider answered: nothing was used.
            self._bill_cut_call(principal, request_id, prepared, attempts, stand_in)
            return
        except BaseException:
            stand_in.withdraw()
            raise
        finally:
            self._routing.report(attempts, self._background)
        outcome = prepared.outcome(served.target, len(served.attempts))
        hold = prepared.hold
        await self._settle(
            principal, None, request_id, outcome, completion, cacheable=False, hold=hold, stand_in=stand_in
        )

    async def stream(
        self,
        principal: Principal,
        request: ChatRequest,
        request_id: str,
        fingerprint: str | None = None,
    ) -> ChatStream:
        """`fingerprint` as for `complete`; a retried stream is replayed from the stored answer."""
        claim = await self._idempotency.claim(principal.tenant_id, request_id, fingerprint)
        if claim.answer is not None:
            return _whole_stream(*_replayed(claim.answer))
        try:
            return await self._stream(principal, request, claim)
        except BaseException:
            await self._idempotency.release(claim)
            raise

    async def _stream(self, principal: Principal, request: ChatRequest, claim: Claim) -> ChatStream:
        prepared = await self._prepare(principal, request, claim.record_request_id)
        try:
            return await self._start_stream(principal, request, claim, prepared)
        except BaseException:
            prepared.hold.end()  # failed before the stream began (its settlement ends it otherwise)
            raise

    async def _start_stream(
        self, principal: Principal, request: ChatRequest, claim: Claim, prepared: _Prepared
    ) -> ChatStream:
        request_id = claim.record_request_id
        if prepared.answer is not None:
            whole = prepared.answer.completion
            outcome = prepared.cached_outcome()
            await self._settle(principal, prepared.cache_key, request_id, outcome, whole, hold=prepared.hold)
            await self._keep_answer(claim, whole, outcome)
            return _whole_stream(whole, outcome)
        attempts: list[Attempt] = []
        try:
            first, rest, served = await self._executor.stream(prepared.targets, request, attempts)
        except BaseException:
            self._bill_cut_call(principal, request_id, prepared, attempts)
            raise
        finally:
            # The attempt that streams is reported when its stream ends (in settle), with its whole time.
            self._routing.report([a for a in attempts if a.outcome != "success"], self._background)
        streamed = attempts[-1]
        outcome = prepared.outcome(served.target, len(served.attempts))
        tally = StreamTally(prompt_estimate=prepared.prompt_estimate)
        tally.add(first)
        call_id = new_call_id()

        async def settle() -> None:
            failure = settled.failure if isinstance(settled.failure, ProviderError) else None
            self._routing.report_stream_end(
                served.target,
                streamed.started,
                streamed.time_to_first_token_ms,
                failure.kind if failure else "",
                retryable=failure.retryable if failure else True,
            )
            metrics.provider_call(
                served.target.provider,
                served.target.model_id,
                time.perf_counter() - streamed.started,
                failure.kind if failure else "",
            )
            # Streamed tool calls arrive as fragments; only whole answers are worth caching.
            completion = tally.completion()
            cacheable = not tally.saw_tool_calls
            await self._settle(
                principal,
                prepared.cache_key,
                request_id,
                outcome,
                completion,
                cacheable=cacheable,
                call_id=call_id,
                hold=prepared.hold,
            )
            # Only a whole answer can be replayed; a stream cut short (here, or by the model's server)
            # frees its key for a real retry.
            if completion.finish_reason == CUT_SHORT:
                await self._idempotency.release(claim)
            else:
                await self._keep_answer(claim, completion, outcome)

        settled = SettledStream(rest, tally, settle)
        # On disk before the first chunk goes out, replaced by the stream's own record (the same call id)
        # when it settles: a Gateway killed mid-stream still bills what the stream had delivered by then.
        stand_in = usage_record(principal, request_id, outcome, tally.completion())
        try:
            await self._usage.stand_in(stand_in, call_id)
        except BaseException:
            await settled.aclose()  # a client gone meanwhile: settled (its stand-in replaced) and closed
            raise
        return ChatStream(first, settled, outcome)


def usage_record(
    principal: Principal, request_id: str, outcome: ChatOutcome, completion: Completion
) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant_id=principal.tenant_id,
        api_key_id=principal.key_id,
        model_id=outcome.model_id,
        provider=outcome.provider,
        input_tokens=completion.prompt_tokens,
        output_tokens=completion.completion_tokens,
        cached=outcome.cache == "hit",
        occurred_at=time.time(),
        task_type=outcome.task_type,
        difficulty=outcome.difficulty,
        planned_model_id=outcome.planned_model_id,
        attempts=outcome.attempts,
        prompt_fingerprint=outcome.prompt_fingerprint,
    )


def _answer(completion: Completion, outcome: ChatOutcome) -> dict:
    """What a retry of the request is answered with."""
    return {"completion": dataclasses.asdict(completion), "outcome": dataclasses.asdict(outcome)}


def _replayed(answer: dict) -> tuple[Completion, ChatOutcome]:
    completion = Completion(**answer["completion"])
    completion.tool_calls = tuple(completion.tool_calls)
    return completion, ChatOutcome(**answer["outcome"])


# An answer known whole is replayed as a stream of pieces of about this many words, as a model would
# send it (clients that render a stream as it comes, or count chunks, see no difference).
REPLAY_WORDS_PER_CHUNK = 4
_WORDS = re.compile(r"\S+\s*|\s+")


def _whole_stream(whole: Completion, outcome: ChatOutcome) -> ChatStream:
    """A stream of an answer known whole (from the cache, or a retry's stored answer), in pieces; the
    last carries the finish reason, the token counts and any tool calls."""
    words = _WORDS.findall(whole.text) or [""]
    pieces = [
        "".join(words[i : i + REPLAY_WORDS_PER_CHUNK]) for i in range(0, len(words), REPLAY_WORDS_PER_CHUNK)
    ]
    chunks = [CompletionChunk(text=piece) for piece in pieces[:-1]]
    chunks.append(
        CompletionChunk(
            text=pieces[-1],
            finish_reason=whole.finish_reason,
            prompt_tokens=whole.prompt_tokens,
            completion_tokens=whole.completion_tokens,
            tool_calls=whole.tool_calls,
        )
    )
    return ChatStream(chunks[0], _ReplayedChunks(chunks[1:], whole), outcome)


def _within_scope(principal: Principal, targets: list[Target]) -> list[Target]:
    """A plan cut to the models the key may use; PERMISSION_DENIED when none is left."""
    allowed = [target for target in targets if principal.scope.allows_model(target.model_id)]
    if not allowed:
        planned = ", ".join(target.model_id for target in targets)
        raise PermissionDenied(
            f"key {principal.key_id} may use only the models {', '.join(principal.scope.models)}; "
            f"the plan has {planned}"
        )
    return allowed


class SettledStream:
    """The rest of a stream, passed through and tallied; settled (recorded, charged, cached) exactly once
    when it ends, fails or is closed, even if it was never iterated. The servicer closes it explicitly
    (`contextlib.aclosing`), so a client that goes away is billed at once, in the RPC's own task."""

    def __init__(
        self,
        chunks: AsyncIterator[CompletionChunk],
        tally: StreamTally,
        settle: Callable[[], Awaitable[None]],
    ) -> None:
        self._chunks = chunks
        self._tally = tally
        self._settle = settle
        self._closed = False
        # What ended the stream early (a ProviderError after the first chunk, a cancellation), if anything.
        self.failure: BaseException | None = None

    def __aiter__(self) -> SettledStream:
        return self

    async def __anext__(self) -> CompletionChunk:
        try:
            chunk = await anext(self._chunks)
        except BaseException as exc:  # the end, a provider failure or the caller's cancellation
            if not isinstance(exc, StopAsyncIteration):
                self.failure = exc
            await self.aclose()
            raise
        self._tally.add(chunk)
        return chunk

    def billed(self) -> Completion:
        """The answer as it is billed so far (token counts estimated where the provider sent none)."""
        return self._tally.completion()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._chunks.aclose()  # stops the provider's generation too
        finally:
            # Shielded: a second cancellation of the RPC must not cut the settlement short.
            await asyncio.shield(asyncio.ensure_future(self._settle()))


class _ReplayedChunks:
    """The rest of a stream replayed from an answer known whole."""

    def __init__(self, chunks: list[CompletionChunk], whole: Completion) -> None:
        self._chunks = iter(chunks)
        self._whole = whole

    def billed(self) -> Completion:
        return self._whole

    def __aiter__(self) -> _ReplayedChunks:
        return self

    async def __anext__(self) -> CompletionChunk:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        return None
