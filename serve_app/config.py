"""Typed application arguments: what a YAML config's `args:` may say, validated before anything starts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.engine.model_files import DEFAULT_MODEL_ENGINE_KWARGS, DEFAULT_MODEL_ID, DEFAULT_MODEL_SOURCE
from serve_app.policy.priority import Priority
from serve_app.policy.request_queue import ClassLimits


class StrictModel(BaseModel):
    """Unknown keys are errors: a misspelt option in YAML must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ClassQueueConfig(StrictModel):
    max_queue_len: int = Field(256, ge=0, description="requests that may wait in this class; more get 429")
    max_wait_s: float = Field(60.0, gt=0, description="a request waiting longer gets 429 with Retry-After")


class QueueConfig(StrictModel):
    high: ClassQueueConfig = ClassQueueConfig(max_queue_len=512, max_wait_s=30.0)
    medium: ClassQueueConfig = ClassQueueConfig()
    low: ClassQueueConfig = ClassQueueConfig(max_wait_s=120.0)
    batch: ClassQueueConfig = ClassQueueConfig(max_queue_len=1024, max_wait_s=3600.0)  # Batch API lines
    aging_s: float = Field(30.0, gt=0, description="waiting this long raises a request by one class")

    def limits(self) -> dict[Priority, ClassLimits]:
        return {p: ClassLimits(**getattr(self, p.label).model_dump()) for p in Priority}


class ReservedConfig(StrictModel):
    high: float | Literal["auto"] = Field(
        "auto",
        description="share of each replica's slots that only high may use; auto: high's measured demand "
        "(Little's law, docs/qos.md)",
    )
    medium: float = Field(0.0, ge=0, lt=1, description="a further share that high and medium may use, low not")
    hold_s: float | None = Field(
        60.0, gt=0, description="a share is held only while a class it is for arrived this recently; null: always"
    )

    @model_validator(mode="after")
    def _leaves_low_some(self) -> ReservedConfig:
        high = 0.0 if self.high == "auto" else self.high
        if high < 0:
            raise ValueError("reserved high must be >= 0, or auto")
        if high + self.medium >= 1:
            raise ValueError("reserved high + medium must be below 1, or low could never run")
        return self


class AdmissionConfig(StrictModel):
    """How the gateway decides what runs: see docs/qos.md."""

    adaptive_limit: bool = Field(
        True,
        description="hold medium and low in the gateway while a replica has prefill_budget_s of prefill pending",
    )
    prefill_budget_s: float = Field(
        1.0, gt=0, description="seconds of prefill, at the replica's measured rate, it may have pending"
    )
    min_prefill_budget_tokens: int = Field(8192, ge=1, description="the prefill budget is never below this")
    routing: Literal["cache_aware", "cache_aware_class_blind", "least_loaded"] = Field(
        "cache_aware", description="how a replica is picked: by cached prefix and token load, or by free slots"
    )
    prefix_index_entries: int = Field(
        200_000, ge=1, description="(prompt block, replica) pairs the prefix index remembers, least recent dropped"
    )
    reserved: ReservedConfig = ReservedConfig()
    preempt_window_s: float | None = Field(
        5.0, gt=0, description="a lower request granted this recently may be preempted for high; null: never"
    )
    shed_on_predicted_wait: bool = Field(True, description="429 at arrival when the predicted wait passes max_wait_s")
    router_lease_s: float = Field(
        15.0,
        gt=0,
        description="a Router not heard from for this long is taken for dead: its slots and queued requests are freed",
    )
    fair_share: bool = Field(
        True, description="within a class, the least-served tenant (API key, else `user`) goes first"
    )


# Admission and the metrics actor, one of each per app, live on the head node: the one node whose loss ends the
# cluster anyway. Ray gives every head node this resource (1 unit); each actor takes a sliver of it.
ON_HEAD_NODE = {"node:__internal_head__": 0.001}

QUEUE_AWARE_POLICY = "serve_app.policy.autoscaling:queue_aware_policy"

# Calls beyond generation (health, model list) that a full replica must still accept.
CONTROL_CALL_HEADROOM = 4

# Ray Serve runs user code, and a handle's routing, on event loops of their own threads by default;
# every streamed chunk then crosses threads. Our replicas never block their loop, so keep one loop:
# measured on 2 CPU cores, this took the gateway from 0.73x to 0.90x of bare vLLM's throughput.
SINGLE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}

# Ray Serve logs a line per handle call by default: two per request at Admission, more for metrics.
NO_ACCESS_LOG = {"enable_access_log": False}


# How long requests in flight may take to finish on shutdown or downscale, unless the config says.
DEFAULT_DRAIN_TIMEOUT_S = 60.0
# Past the drain: time to stop vLLM's server (llm_server.STOP_TIMEOUT_S) and leave, before Ray Serve kills.
SHUTDOWN_MARGIN_S = 30


def shutdown_timeout_s(drain_timeout_s: float) -> float:
    """Ray Serve's graceful_shutdown_timeout_s for a deployment that drains for up to `drain_timeout_s`."""
    return drain_timeout_s + SHUTDOWN_MARGIN_S


class AutoscalingConfig(StrictModel):
    """Replicas follow ongoing plus queued requests (`serve_app.policy.autoscaling`), aiming at `target_ongoing_requests`
    each; the gateway never sends a replica more than `max_ongoing_requests`."""

    min_replicas: int = Field(1, ge=1, description="at least 1: the first request must find a replica to wait for")
    max_replicas: int = Field(
        1, ge=1, description="1 by default: one CPU engine already uses every core of a small host"
    )
    target_ongoing_requests: float = Field(8, gt=0)
    max_ongoing_requests: int = Field(16, ge=1)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0, description="how often each replica reports its load")
    look_back_period_s: float = Field(30.0, gt=0, description="the window Ray Serve averages those reports over")

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.target_ongoing_requests >= self.max_ongoing_requests:
            raise ValueError("target_ongoing_requests must be below max_ongoing_requests, or replicas never scale up")
        return self

    def ray_config(self) -> dict[str, Any]:
        return {**self.model_dump(exclude={"max_ongoing_requests"}), "policy": {"policy_function": QUEUE_AWARE_POLICY}}


class LLMConfig(StrictModel):
    model_id: str = Field(DEFAULT_MODEL_ID, description="the name clients put in `model`")
    model_source: str = Field(DEFAULT_MODEL_SOURCE, description="local folder, hub id, or the builtin default")
    accelerator: Literal["cpu", "gpu"] = "cpu"
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="`vllm serve` options by their argument names, e.g. max_model_len"
    )
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of each engine replica")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(
        None,
        gt=0,
        description="GPUs per replica (default: tensor_parallel_size); a fraction shares one GPU between "
        "replicas, each with its own gpu_memory_utilization share",
    )
    startup_timeout_s: float = Field(900.0, gt=0, description="how long vLLM's server may take to load and warm up")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each replica needs, e.g. {llm_node: 1}: places replicas on the nodes "
        "started with them (`ray start --resources`)",
    )
    autoscaling: AutoscalingConfig = AutoscalingConfig()

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_kwargs.get("tensor_parallel_size", 1))

    def engine_options(self) -> dict[str, Any]:
        """The engine kwargs plus what the default model needs (its dtype)."""
        options = dict(self.engine_kwargs)
        if self.model_source == DEFAULT_MODEL_SOURCE:
            options = {**DEFAULT_MODEL_ENGINE_KWARGS, **options}
        return options

    @model_validator(mode="after")
    def _gpu_only_options(self) -> LLMConfig:
        if self.accelerator == "cpu" and self.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 needs accelerator: gpu")
        if self.num_gpus is not None and self.accelerator == "cpu":
            raise ValueError("num_gpus needs accelerator: gpu")
        if self.num_gpus is not None and self.num_gpus < 1 and self.tensor_parallel_size > 1:
            raise ValueError("a fraction of a GPU (num_gpus < 1) needs tensor_parallel_size 1")
        return self

    def deployment_options(self, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> dict[str, Any]:
        """One GPU per replica; with tensor parallelism, `tensor_parallel_size` GPUs of one node, which
        vLLM's server (a child process of the replica) drives with its own multiprocessing workers."""
        env = dict(SINGLE_LOOP_ENV)
        if self.accelerator == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        env.update(self.env_vars)
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "runtime_env": {"env_vars": env}}
        options: dict[str, Any] = {
            "autoscaling_config": self.autoscaling.ray_config(),
            "max_ongoing_requests": self.autoscaling.max_ongoing_requests + CONTROL_CALL_HEADROOM,
            # Each check also registers the replica again with an Admission that restarted: its period bounds
            # how long a restarted Admission answers 503 "recovering".
            "health_check_period_s": 2,
            "health_check_timeout_s": 60,
            "graceful_shutdown_timeout_s": shutdown_timeout_s(drain_timeout_s),
        }
        gpus = self.num_gpus if self.num_gpus is not None else self.tensor_parallel_size
        actor["num_gpus"] = gpus if self.accelerator == "gpu" else 0
        if self.resources:
            actor["resources"] = dict(self.resources)
        options["ray_actor_options"] = actor
        return options


class HttpConfig(StrictModel):
    """Where the Routers listen. Every Router replica binds this port itself (shared through SO_REUSEPORT), so
    Ray's own HTTP proxy must be off (`proxy_location: Disabled`) or on another port."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535, description="0: no server of our own; Ray's proxy calls the Router")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="a larger request body gets 413")


class BatchConfig(StrictModel):
    """The OpenAI Batch API (`/v1/files`, `/v1/batches`): its lines run in a class below low (docs/qos.md)."""

    enabled: bool = Field(True, description="serve /v1/files and /v1/batches, with a runner on the head node")
    directory: str | None = Field(
        None,
        description="where batch state (SQLite) and files live, on the head node, kept across restarts; "
        "null: ~/.cache/serve-app/batches/<app name>",
    )
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="a larger upload gets 413")
    max_in_flight: int = Field(
        256,
        ge=1,
        description="batch lines queued in Admission or running at once: Admission's load model decides how many "
        "of them run; this only bounds what waits",
    )


class RouterConfig(StrictModel):
    num_replicas: int = Field(1, ge=1, description="Router replicas; they share the queues through Admission")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each Router needs: places Routers on the nodes that have them, e.g. one "
        "per node that a load balancer sends to",
    )


class ApiKeyConfig(StrictModel):
    name: str = Field(description="who the key belongs to: what logs and limits name (the key itself never is)")
    max_priority: Literal["high", "medium", "low"] = Field("high", description="higher asks are capped to this")
    requests_per_s: float | None = Field(None, gt=0, description="more requests get 429 with Retry-After")
    output_tokens_per_min: float | None = Field(None, gt=0, description="past this, requests get 429 until paid back")
    admin: bool = Field(False, description="may read /metrics and /v1/stats")


class AuthConfig(StrictModel):
    """API keys, off while none is given. `key_file` is a YAML or JSON file with the same mapping as `keys`
    (key -> settings), read where the application is built; it keeps keys out of the deploy config."""

    keys: dict[str, ApiKeyConfig] = Field(default_factory=dict)
    key_file: str | None = None

    def resolved(self) -> dict[str, ApiKeyConfig]:
        keys = dict(self.keys)
        if self.key_file:
            import yaml

            with open(self.key_file) as f:
                raw = yaml.safe_load(f) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{self.key_file}: expected a mapping of API key to its settings")
            keys.update({str(k): ApiKeyConfig.model_validate(v) for k, v in raw.items()})
        return keys

    def rate_limits(self) -> dict[str, tuple[float | None, float | None]]:
        return {c.name: (c.requests_per_s, c.output_tokens_per_min) for c in self.resolved().values()}


class TracingConfig(StrictModel):
    """OpenTelemetry traces of requests, one root span each in the Router (docs/tracing.md); off by default."""

    enabled: bool = False
    otlp_endpoint: str = Field("http://127.0.0.1:4318/v1/traces", description="an OTLP/HTTP collector's traces URL")
    service_name: str = Field("serve-app-gateway", description="the `service.name` of the gateway's spans")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of new traces kept; a client's traceparent decides for its own"
    )


class AppArgs(StrictModel):
    llm: LLMConfig = LLMConfig()
    queue: QueueConfig = QueueConfig()
    admission: AdmissionConfig = AdmissionConfig()
    auth: AuthConfig = AuthConfig()
    http: HttpConfig = HttpConfig()
    router: RouterConfig = RouterConfig()
    batch: BatchConfig = BatchConfig()
    drain_timeout_s: float = Field(
        DEFAULT_DRAIN_TIMEOUT_S,
        ge=0,
        description="on shutdown or downscale: how long requests in flight may take to finish",
    )
    replica_check_s: float = Field(2.0, gt=0, description="how often Admission checks that each replica answers")
    metrics_flush_s: float = Field(0.5, gt=0, description="how often the router sends finished requests to metrics")
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="also export the figures through OpenTelemetry"
    )
    tracing: TracingConfig = TracingConfig()
    access_log: bool = Field(
        False, description="one JSON line per finished request on the `serve_app.access` logger (docs/tracing.md)"
    )
