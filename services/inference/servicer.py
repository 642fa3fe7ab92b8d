"""InferenceService over gRPC: validates requests and translates them for the schedulers and models."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time

from sophia.inference.v1 import inference_pb2 as pb
from sophia.inference.v1 import inference_pb2_grpc

from libs.config import REPO_ROOT, InferenceConfig
from libs.errors import InvalidArgument, NotFound, Unavailable, shown
from libs.sentence_embeddings import load_embedding_model
from services.inference import metrics
from services.inference.embedding import EmbeddingPool
from services.inference.engine import ChatModel, load_chat_model
from services.inference.sampling import GenerationParams
from services.inference.scheduler import GenerationScheduler, build_scheduler
from services.inference.text import FinishReason, GenerationEvent

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
MAX_EMBED_INPUTS = 256
MAX_STOP_SEQUENCES = 4
# Stop strings are matched against every new piece of text, inside the loop all generations share.
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, config: InferenceConfig) -> None:
        self._config = config
        self._chat: ChatModel | None = None
        self._scheduler: GenerationScheduler | None = None
        self._embeddings: EmbeddingPool | None = None

    @property
    def weights_dir(self) -> pathlib.Path:
        return REPO_ROOT / self._config.weights_dir

    async def load_models(self) -> None:
        config = self._config
        chat = await asyncio.to_thread(
            load_chat_model,
            config.chat_model,
            self.weights_dir,
            config.device,
            cpu_packed_weights=config.cpu_packed_weights,
        )
        embedding = await asyncio.to_thread(
            load_embedding_model, config.embedding_model, self.weights_dir, config.device
        )
        self._embeddings = EmbeddingPool(
            embedding, self.weights_dir, config.embedding_batch_max, config.embedding_batch_wait_ms / 1000
        )
        # Sized after both models are loaded: on a GPU the KV budget comes from the memory left over.
        scheduler = self._scheduler = build_scheduler(config, chat)
        metrics.observe_scheduler(
            lambda: scheduler.stats().running,
            lambda: scheduler.stats().waiting,
            lambda: scheduler.stats().kv_tokens_reserved,
            scheduler.kv_token_budget,
        )
        self._chat = chat
        log.info(
            "models loaded",
            extra={
                "device": chat.device,
                "dtype": chat.dtype,
                "scheduler": config.scheduler.value,
                "max_running": scheduler.max_running,
                "kv_token_budget": scheduler.kv_token_budget,
            },
        )

    def drain(self, deadline: float) -> None:
        """Shutting down (see __main__): generations end by `deadline`, none start."""
        if self._scheduler is not None:
            self._scheduler.drain(deadline)

    async def close(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.close()
        if self._embeddings is not None:
            await self._embeddings.close()

    def _chat_model(self, model_id: str) -> ChatModel:
        if self._chat is None:
            raise Unavailable("models are still loading")
        if model_id != self._chat.id:
            raise NotFound(f"model: unknown chat model {shown(model_id)}; this server has {self._chat.id!r}")
        return self._chat

    async def _events(self, request, context):
        model = self._chat_model(request.model)
        messages = _messages(request.messages)
        params = self._params(request.options)
        model.check_prompt_chars(messages, params.max_tokens)
        prompt_token_ids = await asyncio.to_thread(model.prompt_token_ids, messages)
        model.check_room(len(prompt_token_ids), params.max_tokens)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        async for event in self._scheduler.stream(prompt_token_ids, params, deadline):
            yield event

    def _params(self, options: pb.GenerationOptions) -> GenerationParams:
        if not 0 < options.max_tokens <= self._config.max_output_tokens:
            raise InvalidArgument(
                "options.max_tokens", f"must be between 1 and {self._config.max_output_tokens}"
            )
        temperature = options.temperature if options.HasField("temperature") else 0.0
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidArgument("options.temperature", f"must be between 0 and {MAX_TEMPERATURE:g}")
        top_p = options.top_p if options.HasField("top_p") else 1.0
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument("options.top_p", "must be greater than 0 and at most 1")
        stops = list(options.stop)
        if len(stops) > MAX_STOP_SEQUENCES or not all(0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
            raise InvalidArgument(
                "options.stop", f"at most {MAX_STOP_SEQUENCES} strings of 1 to {MAX_STOP_CHARS} characters"
            )
        return GenerationParams(
            max_tokens=options.max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=options.seed if options.HasField("seed") else None,
            stop=tuple(stops),
        )

    async def Generate(self, request, context):
        text: list[str] = []
        last: GenerationEvent | None = None
        async for last in self._events(request, context):
            text.append(last.text)
        return pb.GenerateResponse(
            model=request.model,
            text="".join(text),
            finish_reason=FINISH_REASONS[last.finish_reason],
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        )

    async def GenerateStream(self, request, context):
        async for event in self._events(request, context):
            if not event.text and event.finish_reason is None:
                continue
            yield pb.GenerateStreamResponse(
                text=event.text,
                finish_reason=FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
            )

    async def Embed(self, request, context):
        if self._embeddings is None:
            raise Unavailable("models are still loading")
        model = self._embeddings.model
        if request.model != model.id:
            raise NotFound(
                f"model: unknown embedding model {shown(request.model)}; this server has {model.id!r}"
            )
        if not 0 < len(request.inputs) <= MAX_EMBED_INPUTS:
            raise InvalidArgument("inputs", f"must hold between 1 and {MAX_EMBED_INPUTS} strings")
        for i, text in enumerate(request.inputs):
            if not text:
                raise InvalidArgument(f"inputs[{i}]", "must not be empty")
        vectors, tokens = await self._embeddings.embed(list(request.inputs))
        return pb.EmbedResponse(
            model=request.model,
            embeddings=[pb.Vector(values=vector.tolist()) for vector in vectors],
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
                    max_running=self._scheduler.max_running,
                    kv_token_budget=self._scheduler.kv_token_budget,
                )
            )
        if self._embeddings is not None:
            model = self._embeddings.model
            models.append(
                pb.ModelInfo(
                    id=model.id,
                    kind=pb.MODEL_KIND_EMBEDDING,
                    dimensions=model.dimensions,
                    device=model.device,
                )
            )
        return pb.ListModelsResponse(models=models)


def _messages(messages) -> list[dict]:
    if not messages:
        raise InvalidArgument("messages", "must not be empty")
    converted = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        converted.append({"role": message.role, "content": message.content})
    return converted
