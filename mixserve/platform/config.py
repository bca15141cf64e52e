"""The deployment config: one YAML file describes the whole topology.

    model: {name: tiny-mixtral, source: ./checkpoints/tiny-mixtral}
    attention: {replicas: 2}
    experts: {shards: 4, replicate_hottest: 1}     # shards: 0 = experts in-process
    http: {host: 127.0.0.1, port: 8000}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mixserve.errors import CheckpointError, MixserveError
from mixserve.platform.tenants import Tenant, TenantsError, load_tenants, require_unique_names
from mixserve.platform.weights.s3_client import S3Location
from mixserve.replicas.engine_config import EngineConfig


class ConfigError(MixserveError):
    """The deployment config is missing, not YAML, or invalid; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    name: str = Field(..., min_length=1, description="The name clients pass as `model` (also listed by /v1/models).")
    source: str = Field(
        ..., min_length=1,
        description="Checkpoint (safetensors, Hugging Face or Mistral layout): a local folder, or s3://bucket/prefix "
        "(boto3's default credential chain; AWS_ENDPOINT_URL for S3-compatible stores). From S3 each actor fetches "
        "only its own tensors' bytes.",
    )
    cache_dir: str | None = Field(
        "~/.cache/mixserve/weights",
        description="Local disk cache for weights fetched from S3 (per node, keyed by object ETag and size, "
        "re-verified on reuse); null fetches every time.",
    )
    download_workers: int = Field(16, ge=1, le=256, description="Parallel ranged GETs per actor when fetching weights from S3.")
    system_prompt: str | None = Field(
        None, description="Default system prompt for chat requests that bring none (a tenant's own overrides it): "
        "text, or 'guardrail' for the Mistral 7B paper's guardrail prompt.",
    )

    @field_validator("source")
    @classmethod
    def _local_folder_exists(cls, value: str) -> str:
        if value.startswith("s3://"):
            try:
                S3Location.parse(value)
            except CheckpointError as exc:
                raise ValueError(str(exc)) from None
            return value
        if "://" in value:
            raise ValueError(f"unsupported checkpoint source {value!r}: use a local folder or s3://bucket/prefix")
        if not Path(value).is_dir():
            raise ValueError(f"checkpoint folder {value!r} does not exist")
        return value


class AutoscalingSection(_Strict):
    """Ray Serve autoscaling of the attention replicas; min_replicas 0 lets the whole model group
    (attention replicas and expert shards) give its resources back when idle."""

    min_replicas: int = Field(1, ge=0, le=64, description="Fewest attention replicas; 0 scales the model group to zero when idle.")
    max_replicas: int = Field(1, ge=1, le=64, description="Most attention replicas.")
    initial_replicas: int | None = Field(None, ge=0, le=64, description="Replicas at deploy time (default: min_replicas).")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests in flight per replica the autoscaler aims at (about max_num_seqs / 2 keeps batches full)."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay above target this long before a replica is added.")
    downscale_delay_s: float = Field(
        120.0, ge=0, description="Load must stay below target this long before a replica is removed (damps flapping)."
    )
    downscale_to_zero_delay_s: float | None = Field(
        600.0, ge=0, description="Idle seconds before the last replica goes (with min_replicas 0); null = downscale_delay_s.",
    )
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which the load is averaged for each decision.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def serve_config(self) -> dict:
        """Ray Serve's autoscaling_config."""
        config = self.model_dump(exclude_none=True)
        # Ray still checks its deprecated metrics_interval_s (default 10 s) against the look-back.
        config["metrics_interval_s"] = min(10.0, self.look_back_period_s / 2)
        return config


class AttentionSection(_Strict):
    replicas: int = Field(
        1, ge=1, le=64, description="Attention replicas (each holds the non-expert weights and KV caches); "
        "ignored when `autoscaling` is set.",
    )
    autoscaling: AutoscalingSection | None = Field(
        None, description="Scale the attention replicas on load (Ray Serve autoscaling) instead of a fixed count.",
    )
    cold_start_timeout_s: float = Field(
        300.0, gt=0,
        description="How long a request waits for its first token while the model group starts (from zero, or "
        "under a burst); past it the request gets 503 with Retry-After.",
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs each attention replica reserves.")
    gpus_per_replica: float = Field(0.0, ge=0, description="Ray GPUs each attention replica reserves (0 on CPU clusters).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine settings of every replica.")
    max_queued_requests: int = Field(
        256, ge=1, description="Requests queued at the replicas beyond their running ones; more get 503 + Retry-After."
    )


class ExpertsSection(_Strict):
    shards: int = Field(0, ge=0, le=256, description="Expert shard actors; 0 keeps the experts inside each attention replica.")
    experts_per_shard: int | None = Field(
        None, ge=1, description="Expert slots per shard; slots beyond the even split hold replicas of hot experts."
    )
    replicate_hottest: int = Field(0, ge=0, description="Hot experts to replicate into spare slots when the router rebalances.")
    auto_rebalance_s: float = Field(
        0.0,
        ge=0,
        description="Seconds between automatic rebalance checks (copies hot experts into spare slots when the "
        "shards' max/mean load is 1.1 or more); 0 leaves rebalancing to `mixserve rebalance`.",
    )
    idle_release_s: float = Field(
        30.0, ge=0,
        description="With attention autoscaling down to zero: seconds without any attention replica after which "
        "the shards are stopped and their placement group released (they start again with the first replica). "
        "A replica counts as gone 5 s after its last heartbeat.",
    )
    cpus_per_shard: float = Field(1.0, gt=0, description="Ray CPUs each expert shard reserves.")
    gpus_per_shard: float = Field(0.0, ge=0, description="Ray GPUs each expert shard reserves.")
    dispatch_timeout_s: float = Field(30.0, gt=0, description="A shard silent this long fails the step with a retryable error.")
    moe_kernel: Literal["auto", "torch", "zentorch"] = Field(
        "auto",
        description="Kernel the shards run their experts with, as attention.engine.moe_kernel does for in-process "
        "experts: 'auto' takes zentorch's fused MoE layer when it is installed and passes its start-up check, "
        "else 'torch', the grouped oneDNN GEMMs.",
    )
    pin_cpus: Literal["auto", "off"] = Field(
        "auto",
        description="'auto': CPU shards (gpus_per_shard 0) pin their threads to cores of their own, the node's "
        "highest-numbered first, where the node has a core for every shard thread; otherwise, or with 'off', the "
        "OS places them. Unpinned, Linux often wakes two shards of one layer onto the same core while another "
        "idles (mixserve/expert_shards/cpu_pinning.py has the figures). Assumes the node's other busy processes "
        "are not pinned to those cores too.",
    )
    transport: Literal["tcp", "ray"] = Field(
        "tcp",
        description="How token groups travel between replicas and shards: 'tcp' (a direct connection from "
        "each replica to each shard, the fast path) or 'ray' (Ray actor calls; slower, kept for comparison). "
        "See benchmarks/RESULTS.md.",
    )


class HttpSection(_Strict):
    host: str = Field("127.0.0.1", description="Listen address; loopback unless you mean to expose the server.")
    port: int = Field(8000, ge=1, le=65535, description="Listen port of the HTTP front door.")
    front_door: Literal["auto", "replicas", "separate"] = Field(
        "auto",
        description="Where the HTTP and gRPC front door runs. 'replicas': inside every attention replica (an output "
        "never leaves the replica's process before the proxy: the fast path). 'separate': its own deployment of "
        "`ingress_replicas`, which stays up while the attention replicas are scaled to zero (and answers 503 + "
        "Retry-After past cold_start_timeout_s). 'auto': 'separate' when the attention replicas can scale to zero "
        "or ingress_replicas > 1, else 'replicas'.",
    )
    ingress_replicas: int = Field(
        1, ge=1, le=64, description="Front-door replicas with front_door 'separate' (quotas hold across all of them)."
    )
    max_connections: int = Field(
        1024, ge=1, description="Requests each ingress replica handles at once (streams included); more queue at the proxy."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted; larger ones get 413.")


class GrpcSection(_Strict):
    port: int | None = Field(
        None, ge=1, le=65535,
        description="Port of the gRPC front door (mixserve.v1, server reflection on); omitted = no gRPC. Ray Serve's "
        "gRPC proxy listens on all interfaces, so enabling it requires tenants (API keys).",
    )


class ClusterSection(_Strict):
    """The GPU cluster this config is meant for; only `mixserve plan` reads it."""

    gpu: str = Field(..., description="GPU type as clouds name it: A10G, L4, L40S, A100-40GB, A100-80GB, H100, H200.")
    gpus_per_node: int = Field(8, ge=1, le=16, description="GPUs on each worker node.")
    nodes: int = Field(1, ge=1, le=1024, description="Worker nodes (at most, with an autoscaling cluster).")


class DeploymentConfig(_Strict):
    model: ModelSection = Field(..., description="What to serve and where its weights are.")
    attention: AttentionSection = Field(default_factory=AttentionSection, description="The attention side.")
    experts: ExpertsSection = Field(default_factory=ExpertsSection, description="The expert side.")
    http: HttpSection = Field(default_factory=HttpSection, description="The HTTP front door.")
    grpc: GrpcSection = Field(default_factory=GrpcSection, description="The gRPC front door.")
    cluster: ClusterSection | None = Field(
        None, description="The GPU cluster this deployment targets, for `mixserve plan` (serving ignores it).",
    )
    tenants: list[Tenant] = Field(
        default_factory=list, description="Tenants, their hashed API keys and limits. None at all = no key needed (loopback demos).",
    )
    tenants_file: str | None = Field(
        None, description="A YAML file with more tenants (`tenants: [...]`), as `mixserve keys add` writes it.",
    )

    @property
    def scales_to_zero(self) -> bool:
        autoscaling = self.attention.autoscaling
        return autoscaling is not None and autoscaling.min_replicas == 0

    @property
    def front_door_in_replicas(self) -> bool:
        """True when the front door runs inside the attention replicas (http.front_door resolved)."""
        if self.http.front_door == "auto":
            return not self.scales_to_zero and self.http.ingress_replicas == 1
        return self.http.front_door == "replicas"

    @model_validator(mode="after")
    def _front_door_fits(self) -> DeploymentConfig:
        if self.http.front_door == "replicas" and self.scales_to_zero:
            raise ValueError("http.front_door 'replicas' cannot answer while the attention replicas are scaled to zero "
                             "(autoscaling.min_replicas 0): use 'separate' or 'auto'")
        if self.http.front_door == "replicas" and self.http.ingress_replicas != 1:
            raise ValueError("http.ingress_replicas applies to front_door 'separate'; with 'replicas' every attention "
                             "replica is a front door (set attention.replicas or autoscaling)")
        return self

    def serve_start_options(self) -> dict:
        """serve.start() arguments for the proxies this config asks for."""
        options: dict = {"http_options": {"host": self.http.host, "port": self.http.port}}
        if self.grpc.port is not None:
            if not self.all_tenants():
                raise ConfigError(
                    "grpc.port is set but no tenants are configured: Ray Serve's gRPC proxy listens on all "
                    "interfaces, so mixserve only enables it when API keys are required"
                )
            from mixserve.platform.grpc_ingress import SERVICER_FUNCTION

            options["grpc_options"] = {"port": self.grpc.port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
        return options

    def all_tenants(self) -> list[Tenant]:
        """Tenants from the config and from tenants_file; raises ConfigError on a bad file."""
        extra: list[Tenant] = []
        if self.tenants_file:
            try:
                extra = load_tenants(self.tenants_file)
            except TenantsError as exc:
                raise ConfigError(str(exc)) from None
        tenants = [*self.tenants, *extra]
        try:
            require_unique_names(tenants)
        except TenantsError as exc:
            raise ConfigError(f"{exc} (in tenants and tenants_file together)") from None
        return tenants

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping with at least a `model` section")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{path}: {problems}") from None
