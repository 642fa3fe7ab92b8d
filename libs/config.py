"""Configuration: one YAML file plus environment variables, validated at start-up.

The file is `$SOPHIA_CONFIG` (default `config/sophia.yaml`). Two environment mechanisms apply:
- `${VAR}` / `${VAR:-default}` inside YAML strings is replaced by the environment variable;
- `SOPHIA__A__B=value` overrides the key `a.b` (value parsed as YAML),
  e.g. `SOPHIA__SERVICES__GATEWAY__PORT=6000`.
Errors name the offending key so that a typo fails at start-up, not at the first request.
"""

from __future__ import annotations

import os
import pathlib
import re
import tomllib
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "sophia.yaml"
OVERRIDE_PREFIX = "SOPHIA__"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration is unusable; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Services(_Strict):
    gateway: Endpoint = Endpoint(port=50051)
    router: Endpoint = Endpoint(port=50052)
    cache: Endpoint = Endpoint(port=50053)
    ledger: Endpoint = Endpoint(port=50054)
    inference: Endpoint = Endpoint(port=50055)


class Edge(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    admin_port: int = Field(default=9901, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    # A client must have sent its whole request (headers and body) within this time, or it gets 408;
    # Envoy disarms the timer once the request is complete, so long answers and streams are not cut.
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    request_headers_timeout_seconds: float = Field(default=10.0, gt=0)
    # A keep-alive connection with no request in flight is closed after this long.
    idle_timeout_seconds: float = Field(default=60.0, gt=0)
    # Read buffer per client connection: beyond it Envoy stops reading the socket (back-pressure).
    per_connection_buffer_bytes: int = Field(default=32_768, ge=1024)
    # Client connections across the edge; beyond it new connections are refused.
    max_connections: int = Field(default=4096, gt=0)
    # Envoy's heap limit for the overload manager: near it, Envoy stops keep-alive, shortens idle
    # timeouts, resets the streams holding the most memory and finally refuses new requests.
    max_heap_bytes: int = Field(default=512 * 1024 * 1024, ge=64 * 1024 * 1024)


class ServerSettings(_Strict):
    max_message_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # How long SIGTERM waits for in-flight RPCs (streams included) before cancelling them.
    drain_seconds: float = Field(default=30.0, ge=0)
    # Beyond this many concurrent RPCs a server answers RESOURCE_EXHAUSTED at once instead of queueing.
    max_concurrent_rpcs: int = Field(default=512, gt=0)


class ClientSettings(_Strict):
    # Subtracted from the caller's remaining time so our answer gets back before the caller gives up.
    deadline_margin_seconds: float = Field(default=0.05, ge=0)
    # Deadline for an outbound call when the inbound caller set none.
    default_deadline_seconds: float = Field(default=30.0, gt=0)


class Telemetry(_Strict):
    # OTLP/gRPC collector, e.g. "http://127.0.0.1:4317"; empty → traces and metrics are not exported.
    otlp_endpoint: str = ""
    # Prometheus scrape port per service = base + offset of the service; 0 → disabled.
    prometheus_base_port: int = Field(default=0, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ApiKeyConfig(_Strict):
    name: str
    key: str = Field(min_length=8)
    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    # Scope: model ids or shell-style patterns ("gpt-4o*") the key may use, and the endpoints it may call
    # (chat, embeddings); empty → all. Anything else gets PERMISSION_DENIED naming what is missing.
    models: list[str] = []
    endpoints: list[Literal["chat", "embeddings"]] = []


class TenantConfig(_Strict):
    api_keys: list[ApiKeyConfig] = []
    # The tenant's tier (e.g. "free", "enterprise"): flags' tenant_overrides may name it (config/flags.yaml).
    tier: str = Field(default="", max_length=64)


# What a tenant id may be, everywhere it is named (config, admin API, ledger): it becomes part of Redis keys
# and usage records, so a name the ledger or the admin API would refuse must not get past start-up.
TENANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_tenant_ids(names: Iterable[str], where: str) -> None:
    for name in names:
        if not TENANT_ID.fullmatch(name):
            raise ValueError(f"{where}: tenant id {name!r} must be 1 to 64 characters of A-Z a-z 0-9 _ . -")


class AdminKeyConfig(_Strict):
    name: str
    key: str = Field(min_length=8)
    # admin: everything; operator: keys, budgets, flags and cache of its tenants; viewer: read-only.
    role: Literal["admin", "operator", "viewer"]
    # The tenants an operator or viewer acts on; empty → all.
    tenants: list[str] = []

    @field_validator("tenants")
    @classmethod
    def _tenant_ids(cls, tenants: list[str]) -> list[str]:
        _check_tenant_ids(tenants, "tenants")
        return tenants


class AuditConfig(_Strict):
    # The audit log (admin actions, refused admin attempts) keeps at most this many entries and none
    # older than retention_days, whichever is fewer.
    max_entries: int = Field(default=1_000_000, gt=0)
    retention_days: float = Field(default=365, gt=0)


class AuthConfig(_Strict):
    # The bootstrap admin key (role admin); empty → disabled. More admin keys, with roles, below or
    # through the admin API.
    admin_key: str = ""
    admin_keys: list[AdminKeyConfig] = []
    tenants: dict[str, TenantConfig] = {}
    audit: AuditConfig = AuditConfig()
    # A rotated key's old secret keeps working this long unless the rotation says otherwise.
    default_rotation_grace_seconds: int = Field(default=24 * 3600, ge=0)

    @field_validator("tenants")
    @classmethod
    def _tenant_ids(cls, tenants: dict[str, TenantConfig]) -> dict[str, TenantConfig]:
        _check_tenant_ids(tenants, "auth.tenants")
        return tenants


class ProviderConfig(_Strict):
    type: Literal["local", "openai", "anthropic"]
    base_url: str = ""
    # Where the provider's keys come from; they never sit in this file. `api_key_env` names an environment
    # variable holding one key or several separated by commas; `api_key_file` a file with one key per line
    # (a mounted Secret), re-read within a second when it changes. Several keys are used in turn, and one
    # the provider refuses (401/403) is set aside while others remain.
    api_key_env: str = ""
    api_key_file: str = ""
    timeout_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _remote_needs_url(self) -> ProviderConfig:
        if self.type != "local" and not self.base_url:
            raise ValueError(f"base_url is required for a provider of type {self.type!r}")
        return self


class ModelConfig(_Strict):
    provider: str
    kind: Literal["chat", "embedding"] = "chat"
    # The name the provider knows the model by; defaults to the Sophia model id.
    provider_model: str = ""
    context_window: int = Field(default=8192, gt=0)
    enabled: bool = True
    owned_by: str = ""
    # Embedding models: the size of the vectors the model returns (0 = not known), and whether the
    # provider takes a `dimensions` parameter to return fewer (OpenAI's text-embedding-3 models do).
    dimensions: int = Field(default=0, ge=0)
    accepts_dimensions: bool = False
    # Whether the provider embeds token-id arrays as OpenAI does (LangChain sends them by default); a
    # model that does not is refused such input before the call.
    accepts_token_input: bool = False


class ModelProfile(_Strict):
    """What the Router knows about a chat model beyond where it runs (docs/routing.md)."""

    # 1 (weakest, cheapest tier) .. 5 (best): orders the `quality` plan and complex prompts.
    quality: int = Field(default=1, ge=1, le=5)
    # Whether the model takes `tools` / `response_format`: false → requests using them skip it; unset →
    # as its provider allows (the Gateway's adapter refuses what it cannot send, naming the field).
    tools: bool | None = None
    response_format: bool | None = None
    # Good at code: the `code` preference without a configured chain ranks these first.
    code: bool = False


class ClassifierConfig(_Strict):
    # Labelled example prompts per task type (YAML); relative paths are from the repository root.
    examples_file: str = "config/router_examples.yaml"
    # More labelled examples in the JSON Lines format of shared/eval/router_dev.jsonl.
    extra_examples_files: list[str] = []
    # A prompt is complex when the difficulty model's probability of "complex" is at least this: below
    # 0.5 leans towards the strong model, since under-routing costs quality and over-routing only money.
    complex_threshold: float = Field(default=0.45, gt=0, lt=1)
    # Where the examples' embeddings are kept between starts (keyed by the examples' text).
    embedding_cache_dir: str = "var/cache/router"
    # A prompt that arrives without the cache's embedding is embedded by the Router only within this
    # time (and the caller's deadline), at most this many at once; otherwise it is routed unclassified.
    embed_timeout_seconds: float = Field(default=0.2, gt=0)
    max_concurrent_embeddings: int = Field(default=2, ge=1)


class BreakerConfig(_Strict):
    """Circuit breaker per (provider, model), shared by every Router replica through Redis."""

    # Opens after this many failures in a row...
    consecutive_failures: int = Field(default=5, ge=1)
    # ...or when more than this share of the requests in the window failed, with at least min_requests.
    error_rate: float = Field(default=0.5, gt=0, le=1)
    window_seconds: float = Field(default=60.0, gt=0)
    min_requests: int = Field(default=10, ge=1)
    # Open for this long, then half-open: `probes` requests are let through; if they all succeed it
    # closes, if one fails it opens again for another cool-down.
    cooldown_seconds: float = Field(default=30.0, gt=0)
    probes: int = Field(default=1, ge=1)
    # How often each replica reads the shared breaker states from Redis.
    refresh_seconds: float = Field(default=0.25, gt=0)


class RoutingConfig(_Strict):
    default_chain: list[str] = Field(min_length=1)
    default_embedding_model: str
    # model_preference → ordered chain of model ids.
    preferences: dict[Literal["fast", "quality", "code", "balanced"], list[str]] = {}
    # task_type → ordered chain of model ids.
    task_types: dict[str, list[str]] = {}
    # model id → the models to try after it.
    fallback_map: dict[str, list[str]] = {}
    # chat model id → quality, capabilities; a model without a profile is quality 1.
    model_profiles: dict[str, ModelProfile] = {}
    # Feature flags (libs/feature_flags.py); empty → no flags, every model on, every feature off.
    flags_file: str = ""
    classifier: ClassifierConfig = ClassifierConfig()
    breaker: BreakerConfig = BreakerConfig()
    # A tenant that has used at least this share of its monthly budget gets the cheapest capable plan.
    budget_cheaper_above: float = Field(default=0.8, ge=0, le=1)
    # The Router re-reads its config, examples and flag files when they change (polled this often); 0: never.
    watch_seconds: float = Field(default=1.0, ge=0)


class GenerationSchedulerKind(StrEnum):
    # One stepping loop advances every running generation with one forward pass per step (docs/inference.md).
    CONTINUOUS = "continuous"
    # A thread and a KV cache per generation: the baseline `make bench-inference` measures against.
    THREAD_PER_REQUEST = "thread_per_request"


class InferenceConfig(_Strict):
    chat_model: str = "smollm2-135m-instruct"
    embedding_model: str = "all-minilm-l6-v2"
    weights_dir: str = "var/models"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scheduler: GenerationSchedulerKind = GenerationSchedulerKind.CONTINUOUS
    # continuous: sequences one step advances at most.
    max_batch_size: int = Field(default=32, gt=0)
    # continuous: KV-cache tokens the running sequences may hold, counted as allocated: padded rows (4 at
    # least) × the longest prompt + max_tokens among them, rounded up. 0: kv_memory_fraction of the GPU
    # memory free once the models are loaded, or 32768 tokens (1.4 GiB for the default model) on the CPU.
    kv_token_budget: int = Field(default=0, ge=0)
    kv_memory_fraction: float = Field(default=0.5, gt=0, le=0.95)
    # continuous: while others decode, joiners wait at most this long to share one prefill pass (none
    # when nothing else runs); prompts longer than max_prefill_tokens go in chunks between decode steps.
    max_prefill_wait_ms: float = Field(default=100.0, ge=0, le=1000)
    max_prefill_tokens: int = Field(default=2048, gt=0)
    # continuous: a greedy answer is the same batched as alone (every product padded to shapes that round
    # alike); false saves that padding (~1.5x a lone CPU decode step with cpu_packed_weights off, nothing
    # measurable with it on), and a near tie may then flip a token.
    batch_invariant: bool = True
    # On the CPU (float32), the chat model's weights are laid out once for oneDNN's matrix products instead of
    # being repacked by every product: ~1.65x the tokens/s of a 16-sequence batch here (docs/inference.md).
    cpu_packed_weights: bool = True
    # thread_per_request: generations running at once.
    max_concurrent_generations: int = Field(default=4, gt=0)
    # Generations that may wait for room; beyond that they are refused at once (UNAVAILABLE).
    max_queued_generations: int = Field(default=64, ge=0)
    max_output_tokens: int = Field(default=1024, gt=0)
    # Concurrent Embed calls share a forward pass of up to this many texts, on a thread of their own.
    embedding_batch_max: int = Field(default=32, gt=0)
    embedding_batch_wait_ms: float = Field(default=2.0, ge=0, le=100)


class PriceConfig(_Strict):
    input_per_mtok_usd: float = Field(ge=0)
    output_per_mtok_usd: float = Field(ge=0)


class LedgerConfig(_Strict):
    # Model id → price in US dollars per million tokens; a model without a price costs nothing (local).
    prices: dict[str, PriceConfig] = {}
    # Budget alert thresholds (percent of the monthly limit) for budgets set without their own.
    default_alert_percentages: list[Annotated[int, Field(ge=1, le=1000)]] = [50, 80, 100]
    # A Redis command that takes longer fails the RPC with UNAVAILABLE instead of hanging it.
    redis_timeout_seconds: float = Field(default=2.0, gt=0)
    # Month-end projection alerts wait until this much of the month has passed (earlier, a few requests
    # extrapolate to nonsense).
    projection_min_elapsed_hours: float = Field(default=24.0, ge=0)
    # Recommendations (services/ledger/recommendations.py): the fewest records a finding rests on, the
    # share of fallbacks that flags a model, and how many records each one lists as evidence.
    recommendation_min_requests: int = Field(default=3, ge=1)
    recommendation_fallback_rate: float = Field(default=0.2, gt=0, le=1)
    recommendation_evidence_rows: int = Field(default=10, ge=0, le=100)


class McpConfig(_Strict):
    """The MCP server (`python -m services.mcp`): streamable HTTP on host:port (behind the edge at /mcp)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8091, ge=0, le=65535)
    # Each tool call is one Gateway RPC with this deadline (chat on a local CPU model can be slow).
    gateway_timeout_seconds: float = Field(default=120.0, gt=0)


class CacheMode(StrEnum):
    OFF = "off"
    EXACT = "exact"
    # Exact matches first, then similar questions of the same scope (docs/semantic-cache.md).
    SEMANTIC = "exact+semantic"


class EmbeddingRuntime(StrEnum):
    """What computes all-MiniLM-L6-v2's vectors on the CPU (libs/sentence_embeddings.py); CUDA is torch's."""

    TORCH = "torch"
    # The same weights exported to one ONNX graph (pooling included), checked against torch at each load.
    ONNXRUNTIME = "onnxruntime"


class SemanticCacheConfig(_Strict):
    # A cached question is a candidate at this cosine similarity (all-MiniLM-L6-v2) or above; the
    # false-hit guards then decide. Chosen on the dev pairs by cross-validation (tools/eval_semantic_cache).
    similarity_threshold: float = Field(default=0.57, ge=-1, le=1)
    # Candidates compared per lookup, best first; a vetoed best candidate is not replaced by a worse one.
    candidates: int = Field(default=4, ge=1, le=64)
    # When the runner-up is a different question within this much of the best, the lookup is ambiguous.
    ambiguity_margin: float = Field(default=0.01, ge=0, le=1)
    # Micro-batching of embeddings: at most this many texts per model call, and at most this long
    # spent filling a batch (only while busy; an idle model starts at once). Eight, not 32: ONNX Runtime's
    # int8 graph embeds about as many texts per second one at a time as 32 at a time, and while one batch
    # embeds, the lookups of the one before are searched and answered on the event loop; batches of 32
    # made the two take turns (16 concurrent lookups: 397/s, p99 54 ms; batches of 8: 510/s, 51 ms).
    embedding_batch_max: int = Field(default=8, ge=1, le=256)
    embedding_batch_wait_ms: float = Field(default=2.0, ge=0, le=100)
    # Entries indexed per replica across all tenants (about 2.3 KiB each); beyond it the entries soonest
    # to expire leave the index and answer exact lookups only (services/cache/semantic.py says why).
    max_indexed_entries: int = Field(default=400_000, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Threads per batch (0 → the runtime's default), and batches computed at once, each on its own
    # thread. Measured on the shared 2-core machine (load ~6): one thread per batch was best (two torch
    # threads: several times slower, OpenMP threads spin); two workers: -25 % with torch.
    embedding_threads: int = Field(default=1, ge=0)
    embedding_workers: int = Field(default=1, ge=1, le=16)
    # ONNX Runtime gives torch's vectors (cosine ≥ 0.99999 on the dev prompts) for less CPU per lookup, and
    # its forward pass holds no GIL (docs/semantic-cache.md has the figures).
    embedding_runtime: EmbeddingRuntime = EmbeddingRuntime.ONNXRUNTIME
    # int8 weights on CPU (ONNX Runtime: per output channel): 2.4x the embeddings per second, vectors
    # slightly moved (cosine 0.994 to float32; docs/semantic-cache.md has the dev figures). On by default:
    # float32 cannot embed 400 lookups/s on two cores. The Router's classifier, which learned from float32
    # vectors, scores Lookup's int8 vectors as well as its own (tools/eval_router --lookup-vectors).
    int8: bool = True
    # A partition this large is searched by an IVF index (nprobe lists) instead of a flat one.
    ivf_min_entries: int = Field(default=20_000, ge=1)
    ivf_nprobe: int = Field(default=16, ge=1)
    # Replicas apply each other's stores from a Redis stream; this bounds how long one read blocks.
    sync_block_ms: int = Field(default=500, ge=10)


class CacheConfig(_Strict):
    ttl_seconds: int = Field(default=24 * 3600, gt=0)
    # Requests sampled hotter than this are not cached: their answers are meant to vary.
    max_temperature: float = Field(default=0.0, ge=0)
    max_entry_bytes: int = Field(default=256 * 1024, gt=0)
    # Questions longer than this are refused (INVALID_ARGUMENT): they are documents, not questions.
    max_question_chars: int = Field(default=16_384, gt=0)
    # Beyond this many live entries a tenant's soonest-expiring entries are evicted.
    max_entries_per_tenant: int = Field(default=100_000, gt=0)
    # The layers a tenant's requests may be answered from; tenants not listed get default_mode.
    default_mode: CacheMode = CacheMode.SEMANTIC
    tenant_modes: dict[str, CacheMode] = {}
    semantic: SemanticCacheConfig = SemanticCacheConfig()

    def mode(self, tenant_id: str) -> CacheMode:
        return self.tenant_modes.get(tenant_id, self.default_mode)


class GatewayConfig(_Strict):
    cache_enabled: bool = True
    # When the ledger cannot answer CheckBudget: True lets requests through, False refuses them.
    budget_fail_open: bool = True
    # Usage records the ledger could not take wait here (one file per record) until it is back.
    outbox_dir: str = "var/outbox"
    outbox_replay_seconds: float = Field(default=2.0, gt=0)
    # A client's x-request-id is an idempotency key: a retry within this window is answered with the
    # first answer (not run or billed again); the same id with a different request is refused.
    idempotency_window_seconds: float = Field(default=24 * 3600, gt=0)
    # API keys found in Redis are remembered this long per replica: a key revoked through another
    # replica keeps working here for at most this many seconds. 0 → look every key up in Redis.
    key_cache_seconds: float = Field(default=5.0, ge=0)
    # Keys and rate limits live in Redis; a slower command counts as Redis being down (see access.py).
    redis_timeout_seconds: float = Field(default=0.5, gt=0)
    # Admission control (admission.py): requests in flight per replica, beyond which the replica answers
    # 503 at once; the edge refuses beyond the same number (its circuit breaker on the gateway cluster).
    # Size it as throughput × provider latency: CPU-bound work beyond it only queues.
    max_inflight_requests: int = Field(default=256, gt=0)
    # The part of those slots one tenant may hold; beyond it that tenant gets 429 and the others the rest.
    max_tenant_share: float = Field(default=0.5, gt=0, le=1)
    # Sent with a refusal as retry-after-ms (and retry-after in whole seconds, rounded up).
    overload_retry_after_ms: int = Field(default=500, gt=0)


class RedisConfig(_Strict):
    url: str = "redis://127.0.0.1:6379/0"


class TlsMode(StrEnum):
    # Internal services accept only callers presenting a certificate from the mesh CA, and each method
    # only from the identities its service lists.
    MTLS = "mtls"
    # No encryption and no caller authentication: local development only, never the default.
    PLAINTEXT = "plaintext"


class TlsConfig(_Strict):
    mode: TlsMode = TlsMode.MTLS
    # ca.pem, <identity>.pem and <identity>-key.pem (see tools/certs.py); relative to the repository root.
    # `make up` and the test meshes generate them under their state folder when missing.
    dir: str = "var/certs"
    # The Gateway's public port also serves TLS (gateway certificate); callers still present API keys.
    # Envoy reaches the Gateway in plaintext, so this is for direct gRPC clients without the edge.
    gateway_public_tls: bool = False


class Config(_Strict):
    services: Services = Services()
    edge: Edge = Edge()
    server: ServerSettings = ServerSettings()
    clients: ClientSettings = ClientSettings()
    telemetry: Telemetry = Telemetry()
    redis: RedisConfig = RedisConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    routing: RoutingConfig
    inference: InferenceConfig = InferenceConfig()
    gateway: GatewayConfig = GatewayConfig()
    ledger: LedgerConfig = LedgerConfig()
    cache: CacheConfig = CacheConfig()
    mcp: McpConfig = McpConfig()

    @field_validator("models")
    @classmethod
    def _reserved_ids(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if "auto" in models:
            raise ValueError("'auto' is reserved for router-chosen models")
        return models

    @model_validator(mode="after")
    def _references_exist(self) -> Config:
        for model_id, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(f"models.{model_id}.provider: unknown provider {model.provider!r}")
        chains = {"routing.default_chain": self.routing.default_chain}
        chains |= {f"routing.preferences.{k}": v for k, v in self.routing.preferences.items()}
        chains |= {f"routing.task_types.{k}": v for k, v in self.routing.task_types.items()}
        chains |= {f"routing.fallback_map.{k}": [k, *v] for k, v in self.routing.fallback_map.items()}
        chains |= {f"routing.model_profiles.{k}": [k] for k in self.routing.model_profiles}
        for where, chain in chains.items():
            for model_id in chain:
                if self.models.get(model_id, None) is None:
                    raise ValueError(f"{where}: unknown model {model_id!r}")
                if self.models[model_id].kind != "chat":
                    raise ValueError(f"{where}: {model_id!r} is not a chat model")
        embedding = self.models.get(self.routing.default_embedding_model)
        if embedding is None or embedding.kind != "embedding":
            raise ValueError(
                f"routing.default_embedding_model: {self.routing.default_embedding_model!r} "
                "is not a configured embedding model"
            )
        return self

    def provider_model(self, model_id: str) -> str:
        return self.models[model_id].provider_model or model_id


def _interpolate(node: Any, where: str, environ: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            key: _interpolate(value, f"{where}.{key}" if where else str(key), environ)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(value, f"{where}[{i}]", environ) for i, value in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if not value:
            if default is None:
                raise ConfigError(f"{where}: environment variable {name} is not set and has no default")
            return default
        return value

    return _INTERPOLATION.sub(substitute, node)


def _apply_overrides(raw: dict[str, Any], environ: dict[str, str]) -> None:
    for name, value in sorted(environ.items()):
        if not name.startswith(OVERRIDE_PREFIX):
            continue
        path = [part.lower() for part in name[len(OVERRIDE_PREFIX) :].split("__")]
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} does not name a config section")
            node = child
        try:
            node[path[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: value is not valid YAML: {exc}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}")
    return "; ".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    environ = dict(os.environ if environ is None else environ)
    config_path = pathlib.Path(path or environ.get("SOPHIA_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {config_path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping")
    raw = _interpolate(raw, "", environ)
    _apply_overrides(raw, environ)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: {_describe(exc)}") from None


def project_version() -> str:
    """Sophia's version (pyproject.toml), as /health reports it; "unknown" when the file is not shipped."""
    try:
        with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
            return str(tomllib.load(handle)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def load_config_or_exit() -> Config:
    """For entry points: a bad config ends the process with the message, not a traceback."""
    try:
        return load_config()
    except ConfigError as exc:
        raise SystemExit(f"sophia: config error: {exc}") from None
