"""`mixserve plan`: will a deployment config fit a GPU cluster, and how would it lie?

For a model (its config.json, or a named preset) and a cluster (GPU type, GPUs per node,
nodes), it places every expert shard and attention replica on GPUs, adds up each GPU's
memory (expert weights; non-expert weights plus the rolling KV cache pool at the configured
batch and window) and refuses a plan that does not fit, saying why. The arithmetic mirrors
what the actors allocate: a shard holds `experts_per_shard` slots of whole experts for every
layer; a replica holds everything else and max_num_seqs cache slots of min(window, context)
positions per layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mixserve.errors import MixserveError
from mixserve.model.args import ModelArgs
from mixserve.platform.config import DeploymentConfig

# Memory as sold (GB = 1e9 bytes), by the names clouds use.
GPU_MEMORY_GB: dict[str, float] = {
    "T4": 16, "A10G": 24, "L4": 24, "L40S": 48, "A100-40GB": 40, "A100-80GB": 80, "A100": 40,
    "H100": 80, "H100-80GB": 80, "H200": 141, "B200": 180,
}
# The share of a GPU's memory a plan may fill: the rest is for the CUDA context, kernels'
# workspaces and activations (a few GB at these batch sizes).
USABLE_FRACTION = 0.90
ACTIVATION_RESERVE_GB = 2.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(MixserveError):
    """The deployment does not fit the cluster (the message says what and by how much)."""


@dataclass(frozen=True)
class Cluster:
    gpu: str
    gpus_per_node: int
    nodes: int = 1

    @property
    def memory_gb(self) -> float:
        return GPU_MEMORY_GB[self.gpu]

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """'8xA100-80GB', '4xA10G', or '2x8xH100' (2 nodes of 8)."""
        match = re.fullmatch(r"(?:(\d+)x)?(\d+)x([A-Za-z0-9-]+)", text.strip())
        if not match:
            raise PlanError(f"cluster {text!r} is not like 8xA100-80GB or 2x8xH100 (nodes x GPUs per node x type)")
        nodes, gpus, gpu = int(match.group(1) or 1), int(match.group(2)), match.group(3)
        return cls.of(gpu, gpus, nodes)

    @classmethod
    def of(cls, gpu: str, gpus_per_node: int, nodes: int = 1) -> Cluster:
        known = {name.upper(): name for name in GPU_MEMORY_GB}
        if gpu.upper() not in known:
            raise PlanError(f"unknown GPU type {gpu!r}; known: {', '.join(GPU_MEMORY_GB)}")
        if gpus_per_node < 1 or nodes < 1:
            raise PlanError("a cluster needs at least one node with at least one GPU")
        return cls(known[gpu.upper()], gpus_per_node, nodes)


@dataclass
class Device:
    node: int
    index: int
    used_gb: float = 0.0
    share: float = 0.0  # GPU fraction handed out
    holds: list[str] = field(default_factory=list)


@dataclass
class Plan:
    cluster: Cluster
    devices: list[Device]
    lines: list[str]  # what is where, for printing

    def render(self) -> str:
        usable = self.cluster.memory_gb * USABLE_FRACTION
        rows = [f"cluster: {self.cluster.nodes} node(s) x {self.cluster.gpus_per_node} {self.cluster.gpu} "
                f"({self.cluster.memory_gb:g} GB each, {usable:.1f} GB planned usable)", *self.lines, ""]
        rows.append(f"{'node':>4} {'gpu':>3}  {'used GB':>8}  holds")
        for d in self.devices:
            rows.append(f"{d.node:>4} {d.index:>3}  {d.used_gb:>8.1f}  {', '.join(d.holds) or '-'}")
        return "\n".join(rows)


def gb(n_bytes: float) -> float:
    return n_bytes / 1e9


def expert_bytes(args: ModelArgs, dtype_bytes: int) -> int:
    """One expert, every layer: w1, w3 [I, D] and w2 [D, I]."""
    return args.n_layers * 3 * args.dim * args.hidden_dim * dtype_bytes


def attention_side_bytes(args: ModelArgs, dtype_bytes: int) -> int:
    """Everything but the experts: embeddings, LM head, attention, norms, gates (or the dense MLP)."""
    d, hd = args.dim, args.head_dim
    attn = d * (args.n_heads * hd + 2 * args.n_kv_heads * hd) + args.n_heads * hd * d
    per_layer = attn + 2 * d + (args.num_experts * d if args.is_moe else 3 * d * args.hidden_dim)
    head = 0 if args.tie_word_embeddings else args.vocab_size * d
    return (args.vocab_size * d + head + d + args.n_layers * per_layer) * dtype_bytes


def kv_slot_bytes(args: ModelArgs, max_model_len: int, dtype_bytes: int) -> int:
    """One sequence's rolling cache: min(window, context) positions of K and V in every layer."""
    positions = min(args.sliding_window or max_model_len, max_model_len)
    return args.n_layers * 2 * positions * args.n_kv_heads * args.head_dim * dtype_bytes


def make_plan(config: DeploymentConfig, args: ModelArgs, cluster: Cluster) -> Plan:
    engine, experts, attention = config.attention.engine, config.experts, config.attention
    dtype_bytes = DTYPE_BYTES[engine.dtype]
    usable = cluster.memory_gb * USABLE_FRACTION
    max_len = engine.max_model_len or args.max_position_embeddings
    replicas = attention.autoscaling.max_replicas if attention.autoscaling else attention.replicas

    actors: list[tuple[str, float, float]] = []  # (name, GPU share, GB)
    lines: list[str] = []
    if experts.shards:
        if not args.is_moe:
            raise PlanError("experts.shards is set but the model is dense (it has no experts)")
        if experts.shards > args.num_experts:
            raise PlanError(f"experts.shards ({experts.shards}) exceeds the model's {args.num_experts} experts")
        per_shard = experts.experts_per_shard or math.ceil(args.num_experts / experts.shards)
        shard_gb = gb(per_shard * expert_bytes(args, dtype_bytes))
        share = _gpu_share(experts.gpus_per_shard, "experts.gpus_per_shard")
        actors += [(f"shard {s} ({per_shard} expert slots)", share, shard_gb) for s in range(experts.shards)]
        lines.append(f"expert shards: {experts.shards} x {per_shard} expert slots of {gb(expert_bytes(args, dtype_bytes)):.2f} GB "
                     f"= {shard_gb:.1f} GB each")
        side = attention_side_bytes(args, dtype_bytes)
    else:
        side = attention_side_bytes(args, dtype_bytes) + (args.num_experts * expert_bytes(args, dtype_bytes) if args.is_moe else 0)
    # The engine's pool: max_num_seqs slots, capped by kv_cache_memory_gb (as LLMEngine sizes it).
    slot = kv_slot_bytes(args, max_len, dtype_bytes)
    slots = min(engine.max_num_seqs, int(engine.kv_cache_memory_gb * 1024**3 // slot))
    if slots < 1:
        raise PlanError(f"kv_cache_memory_gb={engine.kv_cache_memory_gb:g} holds no sequence ({gb(slot):.2f} GB each)")
    kv = slots * slot
    replica_gb = gb(side + kv) + ACTIVATION_RESERVE_GB
    share = _gpu_share(attention.gpus_per_replica, "attention.gpus_per_replica")
    actors += [(f"attention replica {r}", share, replica_gb) for r in range(replicas)]
    lines.append(f"attention replicas: {replicas} x ({gb(side):.1f} GB weights + {gb(kv):.1f} GB KV cache for "
                 f"{slots} sequences x {min(args.sliding_window or max_len, max_len)} positions "
                 f"+ {ACTIVATION_RESERVE_GB:g} GB activations) = {replica_gb:.1f} GB each")

    needed = sum(s for _, s, _ in actors)
    if needed > cluster.total_gpus + 1e-9:
        raise PlanError(
            f"the deployment needs {needed:g} GPUs ({len(actors)} actors) but the cluster has {cluster.total_gpus} "
            f"{cluster.gpu}; the model's weights alone are {gb(side + args.num_experts * expert_bytes(args, dtype_bytes)):.0f} GB "
            f"in {engine.dtype} against {cluster.total_gpus * usable:.0f} GB usable"
        )
    too_big = [(name, size) for name, _, size in actors if size > usable]
    if too_big:
        name, size = max(too_big, key=lambda item: item[1])
        raise PlanError(
            f"{name} needs {size:.1f} GB but one {cluster.gpu} offers {usable:.1f} GB usable "
            f"({cluster.memory_gb:g} GB); use more shards, fewer max_num_seqs or a shorter max_model_len, or larger GPUs"
        )
    devices = [Device(node, i) for node in range(cluster.nodes) for i in range(cluster.gpus_per_node)]
    # Largest first onto the emptiest device with room (GPU share and memory): first-fit decreasing.
    for name, share, size in sorted(actors, key=lambda a: (-a[1], -a[2])):
        fits = [d for d in devices if d.share + share <= 1 + 1e-9 and d.used_gb + size <= usable]
        if not fits:
            raise PlanError(f"no GPU has room left for {name} ({size:.1f} GB, {share:g} GPU) after placing the others")
        device = min(fits, key=lambda d: (d.used_gb, d.node, d.index))
        device.used_gb += size
        device.share += share
        device.holds.append(name)
    return Plan(cluster, devices, lines)


def _gpu_share(value: float, field_name: str) -> float:
    if value <= 0:
        raise PlanError(f"{field_name} is 0: planning is for GPU clusters (set it to 1, or a fraction to share a GPU)")
    if value > 1:
        raise PlanError(f"{field_name} is {value:g}: an actor spans at most one GPU (experts are not tensor-parallel)")
    return value
