"""The request flow's own decisions: a key limited to some models is served only by them (by the plan, its
fallbacks and the cache); only a whole streamed answer is kept for idempotent retries.

RequestFlow runs for real with its collaborators replaced by small in-process stand-ins (the provider,
the Router's plan, the cache's lookup), which the mesh tests cover for real."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from libs.errors import ServiceError
from services.gateway.access.rate_limits import TokenHold
from services.gateway.access.roles import KeyScope
from services.gateway.domain import ChatRequest, Completion, CompletionChunk, Message, Principal, Target
from services.gateway.providers.base import ProviderError, note_request_sent
from services.gateway.serving.fallback import ChatExecutor
from services.gateway.serving.idempotency import Claim
from services.gateway.serving.request_flow import RequestFlow
from services.gateway.serving.response_cache import (
    CachedAnswer,
    CacheKey,
    CacheLayer,
    CacheLookup,
    CacheStatus,
)
from services.gateway.serving.router_client import Plan

SMALL = Target("small", "p", "small")
QUESTION = ChatRequest(model="auto", messages=(Message("user", "What is the capital of France?"),))


class Provider:
    def __init__(self, last_finish: str = "stop", fails: bool = False) -> None:
        self._last_finish = last_finish
        self._fails = fails
        self.closed = False

    def unsupported(self, request) -> None:
        return None

    async def complete(self, target, request) -> Completion:
        if self._fails:
            raise ProviderError("HTTP 400", retryable=False, kind="http_400")
        return Completion(f"fresh from {target.model_id}", "stop", 3, 2)

    async def stream(self, target, request):
        try:
            yield CompletionChunk(text="Hel")
            yield CompletionChunk(text="lo", finish_reason=self._last_finish)
        finally:
            self.closed = True


class Cache:
    """Holds the answer another key of the tenant got from "big" (or nothing)."""

    def __init__(self, holds_an_answer: bool = True) -> None:
        self._holds_an_answer = holds_an_answer

    def key(self, tenant_id, request, *, semantic_allowed, store):
        return None

    async def lookup(self, key) -> CacheLookup:
        if not self._holds_an_answer:
            return CacheLookup(CacheStatus.MISS)
        answer = CachedAnswer("big", "p", Completion("cached from big", "stop", 3, 2))
        return CacheLookup(CacheStatus.HIT, CacheLayer.EXACT, 1.0, answer)


class Routing:
    async def plan(self, request, *args, **kwargs) -> Plan:
        return Plan((SMALL,), "auto: small")

    def report(self, attempts, background) -> None:
        pass

    def report_stream_end(self, *args, **kwargs) -> None:
        pass


class Limiter:
    """Notes the estimates released by TokenHold.end."""

    def __init__(self) -> None:
        self.released: list[int] = []

    def release(self, key_id: str, tokens: int) -> None:
        self.released.append(tokens)


class Access:
    """Holds every admitted request's estimate on a Limiter; notes the charges."""

    def __init__(self) -> None:
        self.limiter = Limiter()
        self.charged: list[int] = []

    async def admit(self, principal, estimate) -> TokenHold:
        return TokenHold(self.limiter, principal.key_id, estimate)

    def charge(self, principal, tokens, hold) -> None:
        hold.end()
        self.charged.append(tokens)


class Budgets:
    async def check(self, tenant_id) -> float:
        return 0.0


class Usage:
    def __init__(self) -> None:
        self.records = []
        self.call_ids = []
        self.stand_ins = []

    async def stand_in(self, record, call_id) -> None:
        self.stand_ins.append(call_id)

    def stand_in_now(self, call_id, record) -> bool:
        return False  # as with others in flight: the record is written synced

    async def record(self, record, call_id=None, *, over_stand_in=False) -> None:
        self.records.append(record)
        self.call_ids.append(call_id)


class UsageWaitingOnTheJournal(Usage):
    """Its stand-in write never completes (a group commit the client does not wait out)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = asyncio.Event()

    async def stand_in(self, record, call_id) -> None:
        await super().stand_in(record, call_id)
        self.writing.set()
        await asyncio.Event().wait()


@dataclass
class Idempotency:
    """Claims every client-chosen request id; notes which were released and which kept an answer."""

    released: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    async def claim(self, tenant_id, request_id, fingerprint) -> Claim:
        return Claim(request_id, fingerprint or "", request_id, held=fingerprint is not None)

    async def release(self, claim) -> None:
        self.released.append(claim.key)

    async def complete(self, claim, answer) -> None:
        self.kept.append(claim.key)


class SlowProvider(Provider):
    """Answers once `go` is set (a provider still generating when the client leaves)."""

    def __init__(self, completion: Completion | None = None) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.asked = asyncio.Event()
        self._completion = completion or Completion("late answer", "stop", 7, 5)

    async def complete(self, target, request) -> Completion:
        self.asked.set()
        await self.go.wait()
        return self._completion


class Background:
    """Runs what the flow hands off, as the Gateway's background tasks do."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task] = []

    def spawn(self, coroutine) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coroutine))


def flow(
    usage: Usage,
    provider: Provider | None = None,
    cache: Cache | None = None,
    idempotency=None,
    access=None,
    background=None,
    models_off: tuple[str, ...] = (),
) -> RequestFlow:
    providers = {"p": provider or Provider()}
    return RequestFlow(
        None,
        access or Access(),
        Routing(),
        ChatExecutor(providers),
        providers,
        cache or Cache(),
        Budgets(),
        usage,
        background or SimpleNamespace(spawn=lambda coroutine: coroutine.close()),
        idempotency=idempotency or Idempotency(),
        prices=SimpleNamespace(cost_micros=lambda *args, **kwargs: 0),
        flags=SimpleNamespace(
            enabled=lambda *args: False,
            model_enabled=lambda model_id, *args: model_id not in models_off,
            tier_of=lambda tenant_id: "",
        ),
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


async def test_a_cached_answer_from_a_model_flagged_off_for_the_tenant_is_a_miss():
    """Switching a model off for a tenant stops its cached answers too, not only new calls."""
    chat_flow = flow(Usage(), models_off=("big",))
    completion, outcome = await chat_flow.complete(Principal("acme", "key_any"), QUESTION, "r3")
    assert (outcome.model_id, outcome.cache, completion.text) == ("small", "miss", "fresh from small")


async def stream_to_its_end(provider: Provider, idempotency: Idempotency, access=None) -> None:
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    stream = await flow(Usage(), provider, Cache(holds_an_answer=False), idempotency, access).stream(
        Principal("acme", "key_any"), chat, "client-id", fingerprint="fp"
    )
    async for _chunk in stream.rest:
        pass


async def leave_while_starting(
    chat_flow: RequestFlow, reached: asyncio.Event, request_id: str = "r6"
) -> None:
    """Starts a stream and cancels it (its client gone) once `reached` is set."""
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    starting = asyncio.create_task(chat_flow.stream(Principal("acme", "key_any"), chat, request_id))
    await reached.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting


async def test_a_whole_streamed_answer_is_kept_for_retries():
    idempotency = Idempotency()
    await stream_to_its_end(Provider(last_finish="stop"), idempotency)
    assert (idempotency.kept, idempotency.released) == (["client-id"], [])


async def test_a_stream_its_model_server_cancelled_frees_its_request_id_for_a_real_retry():
    idempotency = Idempotency()
    await stream_to_its_end(Provider(last_finish="cancelled"), idempotency)  # ModelInference's CANCELLED
    assert (idempotency.kept, idempotency.released) == ([], ["client-id"])


async def test_a_request_that_fails_ends_its_token_hold_and_one_that_is_answered_is_charged():
    access = Access()
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    who = Principal("acme", "key_any")
    with pytest.raises(ServiceError):
        await flow(Usage(), Provider(fails=True), Cache(holds_an_answer=False), access=access).complete(
            who, chat, "r4"
        )
    assert (len(access.limiter.released), access.charged) == (1, [])  # its estimate no longer counts
    await flow(Usage(), Provider(), Cache(holds_an_answer=False), access=access).complete(who, chat, "r5")
    assert (len(access.limiter.released), access.charged) == (2, [5])


async def test_a_stream_ends_its_token_hold_when_it_is_settled():
    access = Access()
    await stream_to_its_end(Provider(), Idempotency(), access)
    assert (len(access.limiter.released), len(access.charged)) == (1, 1)


async def test_a_stream_whose_client_leaves_while_its_stand_in_is_written_is_settled_at_once():
    usage, access, provider = UsageWaitingOnTheJournal(), Access(), Provider()
    await leave_while_starting(
        flow(usage, provider, Cache(holds_an_answer=False), access=access), usage.writing
    )
    assert usage.call_ids == usage.stand_ins  # its own record replaces the stand-in
    assert (len(access.limiter.released), len(access.charged), provider.closed) == (1, 1, True)


async def test_a_client_that_leaves_before_the_answer_is_still_billed_for_it():
    """The provider bills a call whose client went away: its answer is awaited and recorded anyway."""
    usage, access, provider, background = Usage(), Access(), SlowProvider(), Background()
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    asking = asyncio.create_task(
        flow(usage, provider, Cache(holds_an_answer=False), access=access, background=background).complete(
            Principal("acme", "key_any"), chat, "r7"
        )
    )
    await provider.asked.wait()
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    assert usage.records == []
    provider.go.set()
    await asyncio.gather(*background.tasks)
    assert [(r.request_id, r.input_tokens, r.output_tokens) for r in usage.records] == [("r7", 7, 5)]
    assert access.charged == [12]


class StoringCache(Cache):
    """A miss with a key, noting what the flow stores."""

    def __init__(self) -> None:
        super().__init__(holds_an_answer=False)
        self.stored: list[CachedAnswer] = []

    def key(self, tenant_id, request, *, semantic_allowed, store):
        return CacheKey(tenant_id, request.model, "scope", "question", semantic=False)

    async def store(self, key, answer) -> None:
        self.stored.append(answer)


@pytest.mark.parametrize(
    ("tool_calls", "stored"),
    [((), 1), (({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},), 0)],
)
async def test_an_answer_with_tool_calls_is_never_cached_whatever_its_finish(tool_calls, stored):
    """Some providers end tool calls with "stop"; replayed, their call ids would answer another request."""
    cache, background = StoringCache(), Background()
    provider = SlowProvider(Completion("", "stop", 3, 2, tool_calls))
    provider.go.set()
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    await flow(Usage(), provider, cache, background=background).complete(Principal("acme", "k"), chat, "r8")
    await asyncio.gather(*background.tasks)
    assert len(cache.stored) == stored


class CutProvider(Provider):
    """Sent the request (or not), then the client's deadline passes or the client goes away."""

    def __init__(self, *, sent: bool = True) -> None:
        super().__init__()
        self._sent = sent
        self.asked = asyncio.Event()

    async def complete(self, target, request) -> Completion:
        if self._sent:
            note_request_sent()
        raise ProviderError("deadline passed", retryable=False, status="DEADLINE_EXCEEDED", kind="deadline")

    async def stream(self, target, request):
        if self._sent:
            note_request_sent()
        self.asked.set()
        await asyncio.Event().wait()
        yield CompletionChunk(text="never")


@pytest.mark.parametrize("sent", [True, False])
async def test_a_call_cut_by_the_clients_deadline_is_billed_its_prompt_once_the_provider_had_it(sent):
    usage, background = Usage(), Background()
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    cut = flow(usage, CutProvider(sent=sent), Cache(holds_an_answer=False), background=background)
    with pytest.raises(ServiceError):
        await cut.complete(Principal("acme", "key_any"), chat, "r9")
    await asyncio.gather(*background.tasks)
    billed = [(r.request_id, r.output_tokens) for r in usage.records]
    assert billed == ([("r9", 0)] if sent else [])
    assert all(r.input_tokens > 0 for r in usage.records)  # the prompt's estimate


async def test_a_stream_whose_client_leaves_before_its_first_chunk_is_billed_its_prompt():
    usage, background, provider = Usage(), Background(), CutProvider()
    await leave_while_starting(
        flow(usage, provider, Cache(holds_an_answer=False), background=background), provider.asked, "r10"
    )
    await asyncio.gather(*background.tasks)
    assert [(r.request_id, r.output_tokens) for r in usage.records] == [("r10", 0)]
    assert usage.records[0].input_tokens > 0


class UsageWritingStandIns(Usage):
    """Writes a stand-in at once, as the journal does for a call alone in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.early: list[tuple[str, object]] = []  # (call id, its stand-in record)
        self.over_stand_in: list[bool] = []
        self.withdrawn: list[str] = []

    def stand_in_now(self, call_id, record) -> bool:
        self.early.append((call_id, record()))
        return True

    def withdraw(self, call_id) -> None:
        self.withdrawn.append(call_id)

    async def record(self, record, call_id=None, *, over_stand_in=False) -> None:
        await super().record(record, call_id)
        self.over_stand_in.append(over_stand_in)


class SendingProvider(Provider):
    """Sends the request (as the HTTP adapters mark it), then answers or fails with a provider's 500."""

    async def complete(self, target, request) -> Completion:
        note_request_sent()
        if self._fails:
            raise ProviderError("HTTP 500", retryable=True, kind="http_500")
        return Completion("fresh", "stop", 3, 2)


async def test_a_call_alone_in_flight_is_journaled_as_its_prompt_once_sent_and_its_record_replaces_that():
    usage = UsageWritingStandIns()
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    await flow(usage, SendingProvider(), Cache(holds_an_answer=False)).complete(
        Principal("acme", "k"), chat, "r1"
    )
    [(call_id, stand_in)] = usage.early
    assert (stand_in.request_id, stand_in.output_tokens, stand_in.model_id) == ("r1", 0, "small")
    assert stand_in.input_tokens > 0  # the prompt's estimate, what a call cut after its send is billed
    assert usage.call_ids == [call_id] and usage.over_stand_in == [True]
    assert (usage.records[0].input_tokens, usage.records[0].output_tokens) == (3, 2)
    assert usage.withdrawn == []


async def test_a_call_no_provider_answered_withdraws_its_stand_in():
    usage = UsageWritingStandIns()
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    failing = flow(usage, SendingProvider(fails=True), Cache(holds_an_answer=False))
    with pytest.raises(ServiceError):
        await failing.complete(Principal("acme", "k"), chat, "r2")
    assert usage.records == [] and usage.withdrawn == [usage.early[0][0]]


async def test_a_call_cut_after_its_send_is_billed_over_its_stand_in():
    usage, background = UsageWritingStandIns(), Background()
    chat = ChatRequest(model="small", messages=QUESTION.messages)
    cut = flow(usage, CutProvider(), Cache(holds_an_answer=False), background=background)
    with pytest.raises(ServiceError):
        await cut.complete(Principal("acme", "k"), chat, "r3")
    await asyncio.gather(*background.tasks)
    assert usage.call_ids == [usage.early[0][0]] and usage.over_stand_in == [True]
    assert usage.withdrawn == []
