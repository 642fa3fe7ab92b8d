"""GatewayService over gRPC: authenticate, validate, run the pipeline, shape OpenAI responses."""

from __future__ import annotations

import contextlib
import re
import time
import uuid

from sophia.gateway.v1 import gateway_pb2 as pb
from sophia.gateway.v1 import gateway_pb2_grpc

from libs.config import Config, project_version
from libs.errors import InvalidArgument, NotFound, Unavailable, shown
from libs.logs import request_id_var
from services.gateway.access.admission import Admission
from services.gateway.access.control import AccessControl
from services.gateway.access.roles import Endpoint
from services.gateway.api import translate
from services.gateway.domain import ChatRequest, Principal
from services.gateway.providers.base import ProviderError
from services.gateway.serving import idempotency
from services.gateway.serving.request_flow import ChatOutcome, RequestFlow
from services.gateway.serving.router_client import Routing

VERSION = project_version()
# A route reason names the rule and the models skipped; a header keeps the first part of a long one.
MAX_ROUTE_REASON_CHARS = 256
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# gRPC fails the whole call, answer and all, on a metadata value with any other character.
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]+")


Metadata = tuple[tuple[str, str | bytes], ...]


def _metadata(context) -> Metadata:
    """The call's metadata, read once per RPC (each read builds the tuple anew)."""
    return tuple(context.invocation_metadata() or ())


# Set by the REST edge on a unary call: the answer's headers may come as trailing metadata, which the edge
# copies into the HTTP response headers (see _send_headers).
HEADERS_IN_TRAILERS = "x-sophia-edge-headers-in-trailers"


async def _send_headers(context, metadata: Metadata, headers: tuple[tuple[str, str], ...]) -> None:
    """A unary answer's response metadata. Initial metadata is a batch of its own, sent and completed
    before the answer's (about 0.1 ms on the event loop and gRPC's poller thread); trailing metadata goes
    in the answer's own batch. gRPC callers read initial metadata as documented; the REST edge asks for
    trailers and lifts them into the HTTP response headers."""
    if any(name == HEADERS_IN_TRAILERS for name, _ in metadata):
        context.set_trailing_metadata(headers)
    else:
        await context.send_initial_metadata(headers)


def _fingerprint(metadata: Metadata, rpc: str, request) -> str | None:
    """The request's fingerprint when the client chose its x-request-id (an idempotency key), else None."""
    if not any(name == "x-request-id" for name, _ in metadata):
        return None
    return idempotency.fingerprint(rpc, request)


def cache_control(metadata) -> set[str]:
    """The request's Cache-Control directives, e.g. {"no-cache"}: bypass the cache; {"no-store"}: the
    cache may answer, but this answer is not stored."""
    return {
        directive.strip()
        for name, value in metadata
        if name == "cache-control" and isinstance(value, str)
        for directive in value.lower().split(",")
    }


def header_value(text: str, limit: int = MAX_ROUTE_REASON_CHARS) -> str:
    """Metadata values are printable ASCII: arrows become "->", anything else (non-ASCII, control
    characters) goes."""
    ascii_text = _NOT_PRINTABLE_ASCII.sub("", text.replace("→", "->"))
    return ascii_text if len(ascii_text) <= limit else ascii_text[: limit - 1] + "~"


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        config: Config,
        access: AccessControl,
        routing: Routing,
        flow: RequestFlow,
        admission: Admission,
    ) -> None:
        self._config = config
        self._access = access
        self._routing = routing
        self._flow = flow
        self._admission = admission
        self._started = int(time.time())

    async def _begin(self, context, metadata: Metadata) -> tuple[Principal, str]:
        """Authenticates the caller, settles the request id (the client's, or a new one) and takes an
        admission slot, held until the RPC terminates (a stream's included), or refuses it at once."""
        principal = await self._access.authenticate(metadata)
        request_id = request_id_var.get()
        if request_id and not _REQUEST_ID.fullmatch(request_id):
            raise InvalidArgument("x-request-id", "at most 128 characters of A-Z a-z 0-9 . _ : -")
        if not request_id:
            request_id = uuid.uuid4().hex
            request_id_var.set(request_id)
        slot = self._admission.admit(principal.tenant_id)
        context.add_done_callback(lambda _context: slot.release())
        return principal, request_id

    async def _chat_request(self, principal: Principal, request, metadata: Metadata) -> ChatRequest:
        principal.scope.require_endpoint(principal.key_id, Endpoint.CHAT)
        directives = cache_control(metadata)
        chat = translate.chat_request(
            request.params, cache_header_off="no-cache" in directives, no_store="no-store" in directives
        )
        self._routing.check_model(chat.model, "chat")
        if chat.model != translate.AUTO_MODEL:
            # "auto" plans are cut to the key's models where the plan is made.
            principal.scope.require_model(principal.key_id, chat.model)
        return chat

    @staticmethod
    def _response_headers(request_id: str, outcome: ChatOutcome) -> tuple[tuple[str, str], ...]:
        # Every text from the client, the Router or the config goes through header_value (the request id
        # was checked in _begin): sent after the answer was billed and kept for retries, a value gRPC
        # refuses would turn that answer into an INTERNAL error.
        headers = [
            ("x-request-id", request_id),
            ("x-sophia-provider", header_value(outcome.provider)),
            ("x-sophia-model", header_value(outcome.model_id)),
            ("x-sophia-attempts", str(outcome.attempts)),
            ("x-sophia-cache", outcome.cache),
            ("x-sophia-cost-usd", f"{outcome.cost_micros / 1e6:.6f}"),
        ]
        if outcome.cache_layer:
            headers.append(("x-sophia-cache-layer", outcome.cache_layer))
            if outcome.cache_layer == "semantic":
                headers.append(("x-sophia-cache-similarity", f"{outcome.cache_similarity:.4f}"))
        if outcome.task_type:
            headers.append(("x-sophia-task-type", header_value(outcome.task_type)))
        if outcome.difficulty:
            headers.append(("x-sophia-difficulty", header_value(outcome.difficulty)))
        if outcome.route_reason:
            headers.append(("x-sophia-route-reason", header_value(outcome.route_reason)))
        return tuple(headers)

    async def CreateChatCompletion(self, request, context):
        metadata = _metadata(context)
        principal, request_id = await self._begin(context, metadata)
        if request.params.stream:
            raise InvalidArgument(
                "stream",
                'use StreamChatCompletion for streaming (the REST edge does this for "stream": true)',
            )
        chat = await self._chat_request(principal, request, metadata)
        claimed = _fingerprint(metadata, "CreateChatCompletion", request)
        completion, outcome = await self._flow.complete(principal, chat, request_id, claimed)
        await _send_headers(context, metadata, self._response_headers(request_id, outcome))
        return translate.completion_response(
            f"chatcmpl-{request_id}", int(time.time()), outcome.model_id, completion
        )

    async def StreamChatCompletion(self, request, context):
        metadata = _metadata(context)
        principal, request_id = await self._begin(context, metadata)
        chat = await self._chat_request(principal, request, metadata)
        claimed = _fingerprint(metadata, "StreamChatCompletion", request)
        stream = await self._flow.stream(principal, chat, request_id, claimed)
        # Closed here, in the RPC's own task, however the RPC ends (a client that went away included), so
        # what was delivered is billed at once, not whenever the generator happens to be collected.
        async with contextlib.aclosing(stream.rest):
            async for response in self._stream_responses(context, chat, request_id, stream):
                yield response

    async def _stream_responses(self, context, chat: ChatRequest, request_id: str, stream):
        # The cost is only known at the end of a stream; the header says what it was when the stream opened.
        await context.send_initial_metadata(self._response_headers(request_id, stream.outcome))
        completion_id, created, model = f"chatcmpl-{request_id}", int(time.time()), stream.outcome.model_id
        yield translate.chunk_response(completion_id, created, model, None, first=True)
        if stream.first.text or stream.first.tool_calls or stream.first.finish_reason:
            yield translate.chunk_response(completion_id, created, model, stream.first)
        try:
            async for chunk in stream.rest:
                if chunk.text or chunk.tool_calls or chunk.finish_reason:
                    yield translate.chunk_response(completion_id, created, model, chunk)
        except ProviderError as error:
            # Part of the answer is already with the client: no fallback now. Say so in-band (SSE clients
            # only see messages once the HTTP status went out), then end the RPC with the status.
            failure = Unavailable(f"the provider failed mid-stream: {error.message}")
            yield pb.StreamChatCompletionResponse(
                id=completion_id,
                object="chat.completion.chunk",
                created=created,
                model=model,
                error=pb.StreamError(message=failure.message, type="server_error", code=failure.code.name),
            )
            raise failure from None
        if chat.include_usage:
            # What is billed: a provider that streams no usage is billed (and shown) estimates, not 0/0.
            billed = stream.rest.billed()
            yield pb.StreamChatCompletionResponse(
                id=completion_id,
                object="chat.completion.chunk",
                created=created,
                model=model,
                usage=translate.usage(billed.prompt_tokens, billed.completion_tokens),
            )

    async def CreateEmbeddings(self, request, context):
        metadata = _metadata(context)
        principal, request_id = await self._begin(context, metadata)
        if not request.model:
            raise InvalidArgument(
                "model", f"is required, e.g. {self._config.routing.default_embedding_model!r}"
            )
        principal.scope.require_endpoint(principal.key_id, Endpoint.EMBEDDINGS)
        self._routing.check_model(request.model, "embedding")
        principal.scope.require_model(principal.key_id, request.model)
        inputs = translate.embedding_inputs(request)
        fmt = translate.encoding_format(request)
        target = self._routing.embedding_target(request.model)
        dimensions = request.dimensions if request.HasField("dimensions") else None
        vectors, tokens, outcome = await self._flow.embed(principal, target, inputs, request_id, dimensions)
        await _send_headers(context, metadata, self._response_headers(request_id, outcome))
        return pb.CreateEmbeddingsResponse(
            object="list",
            model=request.model,
            data=[translate.embedding(i, vector, fmt, inputs.typed) for i, vector in enumerate(vectors)],
            usage=pb.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def ListModels(self, request, context):
        principal, request_id = await self._begin(context, _metadata(context))
        await self._access.admit(principal, 0)  # every authenticated request counts against the key's RPM
        await context.send_initial_metadata((("x-request-id", request_id),))
        return pb.ListModelsResponse(object="list", data=translate.model_catalog(self._config, self._started))

    async def GetHealth(self, request, context):
        # No key: load balancers and uptime checks call it. It says nothing secret, and the Router's
        # view behind it is asked at most once a second however often it is called.
        health = await self._routing.health()
        request_id = request_id_var.get()
        if request_id:
            await context.send_initial_metadata((("x-request-id", request_id),))
        return pb.GetHealthResponse(status=health.status, providers=health.providers, version=VERSION)

    async def GetModel(self, request, context):
        principal, request_id = await self._begin(context, _metadata(context))
        await self._access.admit(principal, 0)
        if not request.model:
            raise InvalidArgument("model", "is required, e.g. GET /v1/models/<id>")
        for model in translate.model_catalog(self._config, self._started):
            if model.id == request.model:
                await context.send_initial_metadata((("x-request-id", request_id),))
                # The same fields under the same numbers (see gateway.proto).
                return pb.GetModelResponse.FromString(model.SerializeToString())
        raise NotFound(f"model: {shown(request.model)} does not exist; GET /v1/models lists the models")
