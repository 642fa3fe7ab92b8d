"""The Gateway's side of the response cache: what makes two requests the same, and when to ask.

A request is split into a scope and a question. The scope is everything but the question that shapes the
answer: the tenant, the requested model, the system prompt and earlier turns (as a digest), tools, tool
choice, response format and every sampling parameter. The question is the last user message. The cache
answers only within the same scope: from the exact layer (the same normalised question) or, when the
tenant's mode and the request allow it, from the semantic layer (a similar question that passes the
cache's false-hit guards, see docs/semantic-cache.md).

Requests sampled hotter than `cache.max_temperature` (an unset temperature counts as OpenAI's default of
1) are never cached: their answers are meant to vary. Requests with tools never get a semantic hit.
The cache is an optimisation, so every failure of it is a bypass, never an error for the caller; while
it is known to be down (its breaker is open) it is bypassed without being asked.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import re
from dataclasses import dataclass

import grpc
from sophia.cache.v1 import cache_pb2 as pb
from sophia.cache.v1 import cache_pb2_grpc

from libs.breaker import UNREACHABLE, DependencyBreaker
from libs.config import CacheConfig, CacheMode
from libs.routing_rules import AUTO
from services.gateway.domain import ChatRequest, Completion

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1.0
# The cache sits on the request path; a slow cache must cost less than it could save. A semantic lookup
# embeds the question (tens of milliseconds, more on a busy CPU) and may save a whole model call.
LOOKUP_TIMEOUT_SECONDS = 0.25
SEMANTIC_LOOKUP_TIMEOUT_SECONDS = 1.0
STORE_TIMEOUT_SECONDS = 1.0
_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logit_bias",
)  # fmt: skip
_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
# How models word a refusal at the start of an answer; such answers are never served to other wordings.
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry|unfortunately|i apologi[sz]e)?[,.!\s]*(?:but\s+)?"
    r"(?:i\s+(?:can(?:not|'t| not)|won'?t|am unable to|'?m unable to|am not able to|'?m not able to)\s+"
    r"(?:help|assist|provide|answer|comply|do that|fulfil|support|share|discuss))",
    re.IGNORECASE,
)


class CacheStatus(enum.StrEnum):
    HIT = "hit"
    MISS = "miss"
    BYPASS = "bypass"


class CacheLayer(enum.StrEnum):
    EXACT = "exact"
    SEMANTIC = "semantic"


@dataclass
class CacheKey:
    """Where a request's answer lives in the cache. `embedding` is filled by the lookup (the question's
    vector, computed once) and sent back with the store."""

    tenant_id: str
    model: str
    scope: str
    question: str
    semantic: bool
    store: bool = True
    embedding: tuple[float, ...] = ()


@dataclass
class CachedAnswer:
    model_id: str
    provider: str
    completion: Completion


@dataclass(frozen=True)
class CacheLookup:
    """What the lookup found: for the response headers (x-sophia-cache, -layer, -similarity) and the
    answer on a hit. `embedding` is the question's vector whenever the cache computed one (the Router
    may reuse it: same model over libs.sentence_embeddings.normalise_text of the question)."""

    status: CacheStatus
    layer: CacheLayer | None = None
    similarity: float = 0.0
    answer: CachedAnswer | None = None
    embedding: tuple[float, ...] = ()


BYPASS = CacheLookup(CacheStatus.BYPASS)
LAYERS = {pb.CACHE_LAYER_EXACT: CacheLayer.EXACT, pb.CACHE_LAYER_SEMANTIC: CacheLayer.SEMANTIC}


# Made once: json.dumps with these options builds a new encoder on every call. (Not orjson: its floats are
# written otherwise, e.g. 1e-05 as 0.00001, and every key and fingerprint made so far would change.)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(document) -> str:
    return _CANONICAL.encode(document)


def split_request(request: ChatRequest) -> tuple[str, str, bool]:
    """(scope, question, whether the question is a user's message). The question is the last message;
    everything before it (system prompt, earlier turns) enters the scope as a digest."""
    *earlier, last = request.messages
    history = hashlib.sha256(_canonical([dataclasses.asdict(m) for m in earlier]).encode()).hexdigest()
    last_is_question = last.role == "user" and not last.tool_calls
    scope = {
        "model": request.model,
        "history": history,
        **{name: getattr(request, name) for name in (*_SAMPLING_FIELDS, *_TOOL_FIELDS)},
    }
    if request.model == AUTO:  # planned by the Router, whose model_preference and task_type pick models
        # The Router plans by these too: a request that asks for quality must not get a cheap model's answer.
        scope["routing"] = [request.task_type, request.model_preference]
    if not last_is_question:
        # A tool result or an assistant prefill: only an identical message may match, so it joins the scope.
        scope["last"] = dataclasses.asdict(last)
    elif last.name:  # who asks is part of the question ("What is my name?" asked by alice, then by bob)
        scope["asker"] = last.name
    return _canonical(scope), last.content or last.role, last_is_question


def prompt_fingerprint(request: ChatRequest, key: CacheKey | None = None) -> str:
    """A digest of everything that determines the answer (model, conversation, sampling, tools): the ledger
    counts repeated prompts with it without ever holding a prompt. Computed for every request, cached or
    not: what repeats is a cache opportunity. From `key` when the request has one (the same split)."""
    scope, question = (key.scope, key.question) if key is not None else split_request(request)[:2]
    return hashlib.sha256(f"{scope}\n{question}".encode()).hexdigest()


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text.strip()[:200]))


def answer_end(completion: Completion) -> int:
    if completion.finish_reason == "length":
        return pb.ANSWER_END_TRUNCATED
    if completion.finish_reason == "content_filter" or looks_like_refusal(completion.text):
        return pb.ANSWER_END_REFUSAL
    return pb.ANSWER_END_COMPLETE


class ResponseCache:
    def __init__(
        self,
        stub: cache_pb2_grpc.CacheServiceStub,
        config: CacheConfig,
        enabled: bool,
        breaker: DependencyBreaker,
    ) -> None:
        self._stub = stub
        self._config = config
        self._enabled = enabled
        self._breaker = breaker

    def key(
        self, tenant_id: str, request: ChatRequest, *, semantic_allowed: bool = True, store: bool = True
    ) -> CacheKey | None:
        """Where this request's answer lives in the cache; None when it must not be cached.

        `semantic_allowed`: the Gateway's switch for the semantic layer (a feature flag); the tenant's
        mode (`cache.tenant_modes`, else `cache.default_mode`) must allow it too. `store=False`
        (Cache-Control: no-store) looks up but never stores."""
        mode = self._config.mode(tenant_id)
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        if not self._enabled or mode == CacheMode.OFF or not request.use_cache or not request.messages:
            return None
        if temperature > self._config.max_temperature:
            return None
        scope, question, is_question = split_request(request)
        semantic = semantic_allowed and mode == CacheMode.SEMANTIC and is_question and not request.tools
        return CacheKey(tenant_id, request.model, scope, question, semantic, store)

    async def lookup(self, key: CacheKey | None) -> CacheLookup:
        """A hit with its answer, a miss, or a bypass when not cacheable or the cache is down."""
        if key is None or not self._breaker.allows():
            return BYPASS
        try:
            reply = await self._stub.Lookup(
                pb.LookupRequest(
                    tenant_id=key.tenant_id,
                    model=key.model,
                    scope=key.scope,
                    question=key.question,
                    semantic=key.semantic,
                    embedding=key.embedding,
                ),
                timeout=SEMANTIC_LOOKUP_TIMEOUT_SECONDS if key.semantic else LOOKUP_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            self._failed("lookup", exc)
            return BYPASS
        self._breaker.record_success()
        key.embedding = tuple(reply.embedding) or key.embedding
        if reply.result != pb.CACHE_RESULT_HIT:
            return CacheLookup(CacheStatus.MISS, similarity=reply.similarity, embedding=key.embedding)
        try:
            stored = json.loads(reply.response)
            answer = CachedAnswer(stored["model_id"], stored["provider"], Completion(**stored["completion"]))
        except (ValueError, KeyError, TypeError):
            log.error("unreadable cache entry ignored")
            return CacheLookup(CacheStatus.MISS, embedding=key.embedding)
        answer.completion.tool_calls = tuple(answer.completion.tool_calls)
        return CacheLookup(
            CacheStatus.HIT, LAYERS.get(reply.layer), reply.similarity, answer, embedding=key.embedding
        )

    async def store(
        self, key: CacheKey, answer: CachedAnswer, embedding: tuple[float, ...] | None = None
    ) -> None:
        """Stores the answer under the key, with the question's vector (the lookup's, by default)."""
        if not key.store or not self._breaker.allows():
            return
        value = {
            "model_id": answer.model_id,
            "provider": answer.provider,
            "completion": dataclasses.asdict(answer.completion),
        }
        try:
            await self._stub.Store(
                pb.StoreRequest(
                    tenant_id=key.tenant_id,
                    model=key.model,
                    scope=key.scope,
                    question=key.question,
                    response=json.dumps(value).encode(),
                    embedding=key.embedding if embedding is None else embedding,
                    semantic=key.semantic,
                    answer_end=answer_end(answer.completion),
                ),
                timeout=STORE_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            self._failed("store", exc)
            return
        self._breaker.record_success()

    async def close(self) -> None:
        await self._breaker.aclose()

    def _failed(self, operation: str, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in UNREACHABLE:
            self._breaker.record_failure(f"{operation}: {exc.code().name}")  # logs once per outage
        else:
            log.warning("cache %s failed (%s); bypassing the cache", operation, exc.code().name)
