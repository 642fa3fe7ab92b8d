"""The local model as a provider: ModelInference over gRPC, with the same contract as HTTP providers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from libs import deadline
from libs.clients import open_channel
from libs.config import ClientSettings
from libs.errors import ServiceError
from services.gateway.domain import (
    CUT_SHORT,
    ChatRequest,
    Completion,
    CompletionChunk,
    Target,
    estimated_input_tokens,
    with_estimated_usage,
)
from services.gateway.providers.base import CALLER_DEADLINE, ProviderError

# What ModelInference answers when the Gateway forwards a bad request are the caller's errors; anything
# else (too long for this model, unreachable, overloaded, too slow) is worth trying the next target for.
_CALLER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: CUT_SHORT,
}
DEFAULT_MAX_TOKENS = 256
# The error kind of a prompt too long for the model (services/router/servicer.py REQUEST_ERRORS).
CONTEXT_WINDOW = "context_window"
# A DEADLINE_EXCEEDED with at most this much of the caller's own time left was the caller's deadline.
CALLERS_DEADLINE_SLACK_SECONDS = 0.2


@contextlib.contextmanager
def _as_provider_errors():
    """ModelInference's statuses (and a deadline already passed) as the ProviderError the Gateway expects."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise _provider_error(exc) from None
    except ServiceError as exc:  # the caller's deadline passed before the call could start
        raise ProviderError(
            exc.message, retryable=False, status=exc.code.name, kind=CALLER_DEADLINE
        ) from None


def _provider_error(exc: grpc.aio.AioRpcError) -> ProviderError:
    code = exc.code()
    if code in _CALLER_ERRORS:
        return ProviderError(exc.details() or code.name, retryable=False, status=code.name, kind="rejected")
    if code == grpc.StatusCode.OUT_OF_RANGE:
        # The prompt (plus max_tokens) is too long for this model's window or this server's KV budget: a
        # model with a larger window may take it, so the chain goes on; if none is left, the caller gets
        # the 400 that names the field. It says nothing of the model's health: the Router takes the kind
        # CONTEXT_WINDOW as a refused request (REJECTED), whatever outcome it is reported with, so that
        # long prompts cannot open the local model's breaker.
        return ProviderError(
            exc.details() or code.name, retryable=True, status="INVALID_ARGUMENT", kind=CONTEXT_WINDOW
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if deadline.spent(CALLERS_DEADLINE_SLACK_SECONDS):
            # The call's deadline was the caller's own (less the clients' margin): no verdict on the model,
            # so one tenant's short deadlines cannot open its breaker for everyone.
            return ProviderError(
                "the request's deadline passed while the local model was answering",
                retryable=False,
                status=code.name,
                kind=CALLER_DEADLINE,
            )
        return ProviderError("local model timed out", retryable=True, status=code.name, kind="timeout")
    return ProviderError(
        f"local model unavailable ({code.name.lower()})",
        retryable=True,
        status="UNAVAILABLE",
        kind=code.name.lower(),
    )


class LocalProvider:
    def __init__(self, name: str, address: str, settings: ClientSettings) -> None:
        self.name = name
        self._channel = open_channel(
            address,
            service="sophia.inference.v1.InferenceService",
            idempotent_methods=("Embed", "ListModels"),
            settings=settings,
        )
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)

    def unsupported(self, request: ChatRequest) -> tuple[str, str] | None:
        if request.tools:
            return "tools", "tool calling is not supported by local models"
        if request.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool calling is not supported by local models"
        if request.logit_bias:
            return "logit_bias", "not supported by local models"
        if request.presence_penalty or request.frequency_penalty:
            field = "presence_penalty" if request.presence_penalty else "frequency_penalty"
            return field, "not supported by local models (use 0)"
        if request.response_format and request.response_format.get("type", "text") != "text":
            return "response_format", "only {'type': 'text'} is supported by local models"
        for i, message in enumerate(request.messages):
            if message.role == "tool" or message.tool_calls:
                return f"messages[{i}]", "tool messages are not supported by local models"
        return None

    def _options(self, request: ChatRequest) -> pb.GenerationOptions:
        options = pb.GenerationOptions(
            max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS, stop=list(request.stop)
        )
        if request.temperature is not None:
            options.temperature = request.temperature
        if request.top_p is not None:
            options.top_p = request.top_p
        if request.seed is not None:
            options.seed = request.seed
        return options

    def _messages(self, request: ChatRequest) -> list[pb.Message]:
        return [pb.Message(role=m.role, content=m.content) for m in request.messages]

    async def complete(self, target: Target, request: ChatRequest) -> Completion:
        with _as_provider_errors():
            reply = await self._stub.Generate(
                pb.GenerateRequest(
                    model=target.provider_model,
                    messages=self._messages(request),
                    options=self._options(request),
                )
            )
        # Unset counts read as 0 in proto3: a ModelInference that sent none is billed for estimates.
        completion = Completion(
            text=reply.text,
            finish_reason=_FINISH_REASONS.get(reply.finish_reason, "stop"),
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
        )
        return with_estimated_usage(completion, request)

    async def stream(self, target: Target, request: ChatRequest) -> AsyncIterator[CompletionChunk]:
        call = None
        try:
            with _as_provider_errors():
                call = self._stub.GenerateStream(
                    pb.GenerateStreamRequest(
                        model=target.provider_model,
                        messages=self._messages(request),
                        options=self._options(request),
                    )
                )
                async for piece in call:
                    yield CompletionChunk(
                        text=piece.text,
                        finish_reason=_FINISH_REASONS.get(piece.finish_reason),
                        prompt_tokens=piece.prompt_tokens,
                        completion_tokens=piece.completion_tokens,
                    )
        finally:
            # A client that went away must stop the generation too, not leave it burning the cores.
            if call is not None:
                call.cancel()

    async def embed(
        self, target: Target, inputs: list[str], dimensions: int | None = None
    ) -> tuple[list[list[float]], int]:
        # Local models return their native size only; the Gateway refuses any other before calling.
        with _as_provider_errors():
            reply = await self._stub.Embed(pb.EmbedRequest(model=target.provider_model, inputs=inputs))
        vectors = [list(vector.values) for vector in reply.embeddings]
        return vectors, reply.prompt_tokens or estimated_input_tokens(inputs)

    async def close(self) -> None:
        await self._channel.close()
