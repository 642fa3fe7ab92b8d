"""InferenceService over gRPC: validates requests and translates them for the engine."""

from __future__ import annotations

import asyncio
import logging
import pathlib

from opentelemetry import metrics
from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from libs.config import REPO_ROOT, InferenceConfig
from libs.errors import InvalidArgument, NotFound, Unavailable, shown
from services.inference.engine import (
    ChatModel,
    EmbeddingModel,
    GenerationParams,
    PromptTooLong,
    load_chat_model,
    load_embedding_model,
)
from services.inference.scheduler import GenerationScheduler

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
MAX_EMBED_INPUTS = 256
MAX_STOP_SEQUENCES = 4


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, config: InferenceConfig) -> None:
        self._config = config
        self._scheduler = GenerationScheduler(
            config.max_concurrent_generations, config.max_queued_generations
        )
        self._chat: ChatModel | None = None
        self._embedding: EmbeddingModel | None = None

    @property
    def weights_dir(self) -> pathlib.Path:
        return REPO_ROOT / self._config.weights_dir

    async def load_models(self) -> None:
        # Made here, once the server has set up telemetry: observable gauges are not forwarded by the
        # placeholder meter that exists before.
        metrics.get_meter("sophia.inference").create_observable_gauge(
            "sophia.inference.generations",
            callbacks=[lambda _options: [metrics.Observation(self._scheduler.admitted)]],
            description="Generations and embedding batches running or waiting for a slot",
        )
        self._chat = await asyncio.to_thread(
            load_chat_model, self._config.chat_model, self.weights_dir, self._config.device
        )
        self._embedding = await asyncio.to_thread(
            load_embedding_model, self._config.embedding_model, self.weights_dir, self._config.device
        )
        log.info("models loaded", extra={"device": self._chat.device, "dtype": self._chat.dtype})

    async def close(self) -> None:
        self._scheduler.shutdown()

    def _chat_model(self, model_id: str) -> ChatModel:
        if self._chat is None:
            raise Unavailable("models are still loading")
        if model_id != self._chat.id:
            raise NotFound(f"model: unknown chat model {shown(model_id)}; this server has {self._chat.id!r}")
        return self._chat

    def _generation(self, request: pb.GenerateRequest | pb.GenerateStreamRequest):
        model = self._chat_model(request.model)
        if not request.messages:
            raise InvalidArgument("messages", "must not be empty")
        messages = []
        for i, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
            messages.append({"role": message.role, "content": message.content})
        options = request.options
        if not 0 < options.max_tokens <= self._config.max_output_tokens:
            raise InvalidArgument(
                "options.max_tokens", f"must be between 1 and {self._config.max_output_tokens}"
            )
        temperature = options.temperature if options.HasField("temperature") else 0.0
        if not 0.0 <= temperature <= 2.0:
            raise InvalidArgument("options.temperature", "must be between 0 and 2")
        top_p = options.top_p if options.HasField("top_p") else 1.0
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument("options.top_p", "must be greater than 0 and at most 1")
        if len(options.stop) > MAX_STOP_SEQUENCES or any(not stop for stop in options.stop):
            raise InvalidArgument("options.stop", f"at most {MAX_STOP_SEQUENCES} non-empty strings")
        params = GenerationParams(
            max_tokens=options.max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=options.seed if options.HasField("seed") else None,
            stop=tuple(options.stop),
        )
        return model, messages, params

    def _events(self, request):
        model, messages, params = self._generation(request)

        def produce(cancelled):
            try:
                yield from model.generate(messages, params, cancelled)
            except PromptTooLong as exc:
                raise InvalidArgument("messages", str(exc)) from None

        return self._scheduler.stream(produce)

    async def Generate(self, request, context):
        text, last = [], None
        async for event in self._events(request):
            text.append(event.text)
            last = event
        return pb.GenerateResponse(
            model=request.model,
            text="".join(text),
            finish_reason=FINISH_REASONS[last.finish_reason],
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        )

    async def GenerateStream(self, request, context):
        async for event in self._events(request):
            if not event.text and event.finish_reason is None:
                continue
            yield pb.GenerateStreamResponse(
                text=event.text,
                finish_reason=FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
            )

    async def Embed(self, request, context):
        if self._embedding is None:
            raise Unavailable("models are still loading")
        if request.model != self._embedding.id:
            raise NotFound(
                f"model: unknown embedding model {shown(request.model)}; "
                f"this server has {self._embedding.id!r}"
            )
        if not 0 < len(request.inputs) <= MAX_EMBED_INPUTS:
            raise InvalidArgument("inputs", f"must hold between 1 and {MAX_EMBED_INPUTS} strings")
        for i, text in enumerate(request.inputs):
            if not text:
                raise InvalidArgument(f"inputs[{i}]", "must not be empty")
        inputs = list(request.inputs)
        vectors, tokens = await self._scheduler.run(lambda: self._embedding.embed(inputs))
        return pb.EmbedResponse(
            model=request.model,
            embeddings=[pb.Vector(values=vector) for vector in vectors],
            prompt_tokens=tokens,
        )

    async def ListModels(self, request, context):
        models = []
        if self._chat is not None:
            models.append(
                pb.ModelInfo(
                    id=self._chat.id,
                    kind=pb.MODEL_KIND_CHAT,
                    context_window=self._chat.context_window,
                    device=self._chat.device,
                    dtype=self._chat.dtype,
                )
            )
        if self._embedding is not None:
            models.append(
                pb.ModelInfo(
                    id=self._embedding.id,
                    kind=pb.MODEL_KIND_EMBEDDING,
                    dimensions=self._embedding.dimensions,
                    device=self._embedding.device,
                )
            )
        return pb.ListModelsResponse(models=models)
