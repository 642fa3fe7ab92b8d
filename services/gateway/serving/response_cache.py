"""The Gateway's side of the response cache: what makes two requests the same, and when to ask.

Two requests share an answer when the tenant, the requested model, the messages and every parameter
that shapes the answer are equal. Requests sampled hotter than `cache.max_temperature` (an unset
temperature counts as OpenAI's default of 1) are never cached: their answers are meant to vary.
The cache is an optimisation, so every failure of it is a bypass, never an error for the caller; while
it is known to be down (its breaker is open) it is bypassed without being asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import grpc
from sophia.cache.v1 import cache_pb2 as pb
from sophia.cache.v1 import cache_pb2_grpc

from libs.breaker import UNREACHABLE, DependencyBreaker
from libs.config import CacheConfig
from services.gateway.domain import ChatRequest, Completion

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1.0
# The cache sits on the request path; a slow cache must cost less than it could save.
LOOKUP_TIMEOUT_SECONDS = 0.25
STORE_TIMEOUT_SECONDS = 1.0
_ANSWER_SHAPING_FIELDS = (
    "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logit_bias", "tools", "tool_choice", "parallel_tool_calls", "response_format",
)  # fmt: skip


@dataclass(frozen=True)
class CacheKey:
    tenant_id: str
    model: str
    request_key: str
    prompt_text: str


@dataclass
class CachedAnswer:
    model_id: str
    provider: str
    completion: Completion


def request_key(request: ChatRequest) -> str:
    """Canonical JSON of everything that determines the answer."""
    document = {
        "messages": [dataclasses.asdict(message) for message in request.messages],
        **{name: getattr(request, name) for name in _ANSWER_SHAPING_FIELDS},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prompt_text(request: ChatRequest) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in request.messages)


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

    def key(self, tenant_id: str, request: ChatRequest) -> CacheKey | None:
        """Where this request's answer lives in the cache; None when it must not be cached."""
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        if not (self._enabled and request.use_cache and temperature <= self._config.max_temperature):
            return None
        return CacheKey(tenant_id, request.model, request_key(request), prompt_text(request))

    async def lookup(self, key: CacheKey | None) -> tuple[str, CachedAnswer | None]:
        """("hit", answer), ("miss", None) or ("bypass", None) when not cacheable or the cache is down."""
        if key is None or not self._breaker.allows():
            return "bypass", None
        try:
            reply = await self._stub.Lookup(
                pb.LookupRequest(
                    tenant_id=key.tenant_id,
                    model=key.model,
                    request_key=key.request_key,
                    prompt_text=key.prompt_text,
                ),
                timeout=LOOKUP_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            self._failed("lookup", exc)
            return "bypass", None
        self._breaker.record_success()
        if reply.result in (pb.CACHE_RESULT_EXACT_HIT, pb.CACHE_RESULT_SEMANTIC_HIT):
            try:
                stored = json.loads(reply.response)
                answer = CachedAnswer(
                    stored["model_id"], stored["provider"], Completion(**stored["completion"])
                )
            except (ValueError, KeyError, TypeError):
                log.error("unreadable cache entry ignored")
                return "miss", None
            answer.completion.tool_calls = tuple(answer.completion.tool_calls)
            return "hit", answer
        return "miss", None

    async def store(self, key: CacheKey, answer: CachedAnswer) -> None:
        if not self._breaker.allows():
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
                    request_key=key.request_key,
                    prompt_text=key.prompt_text,
                    response=json.dumps(value).encode(),
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
