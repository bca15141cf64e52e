"""An expert shard: some of the experts of every MoE layer, and the compute for their tokens.

`ExpertShard` is a plain class so that tests and the in-process transport can use it
directly; `mixserve.expert_shards.actors` wraps it as a Ray actor. It reads only its own
experts' tensors from the checkpoint and runs its tokens through the engine's own MoE code
(`LocalExperts`: dropless grouped GEMMs, or a library's fused layer), and combines their
gate-weighted outputs itself, so only one row per token travels back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixserve.errors import CheckpointError
from mixserve.model.args import ModelArgs
from mixserve.model.checkpoint import load_weights
from mixserve.model.factory import DTYPES
from mixserve.model.moe import LocalExperts
from mixserve.model.moe_kernels import resolve_moe_kernel
from mixserve.model.packed import pack_model
from mixserve.model.weights_source import WeightsSource, as_weights_source


class _FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, n_experts: int):
        super().__init__()
        self.experts = LocalExperts(n_experts, args.dim, args.hidden_dim)


class _Block(nn.Module):
    def __init__(self, args: ModelArgs, n_experts: int):
        super().__init__()
        self.feed_forward = _FeedForward(args, n_experts)


class ShardExperts(nn.Module):
    """Parameter names mirror Transformer's (layers.{i}.feed_forward.experts.w13), so the
    checkpoint name table loads it unchanged."""

    def __init__(self, args: ModelArgs, n_experts: int):
        super().__init__()
        self.layers = nn.ModuleList(_Block(args, n_experts) for _ in range(args.n_layers))


@dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    experts: tuple[int, ...]
    weight_bytes: int
    address: str | None = None  # where its data channel listens (None in-process)
    moe_kernel: str = "torch"  # the kernel its experts run ('auto' resolved)
    cpus: tuple[int, ...] = ()  # the cores its threads are pinned to; () when not pinned


class ExpertShard:
    def __init__(self, shard_id: int, checkpoint: str | Path | WeightsSource, experts: list[int], dtype: str = "float32",
                 moe_kernel: str = "auto"):
        # One source for the shard's life: a remote one keeps its headers for add_expert.
        self.weights = as_weights_source(checkpoint)
        args = ModelArgs.from_folder(self.weights.folder())
        if not args.is_moe:
            raise CheckpointError(f"{self.weights.describe()} is a dense model: it has no experts to shard")
        bad = [e for e in experts if not 0 <= e < args.num_experts]
        if bad or not experts:
            raise ValueError(f"shard {shard_id}: experts {experts} must be a non-empty subset of 0..{args.num_experts - 1}")
        self._args, self._dtype = args, DTYPES[dtype]
        # 'auto' (zentorch's fused layer when it works here, mixserve/model/moe_kernels.py) by
        # default: one attention engine on the 2-core CI machine, switched between two groups of
        # 2 one-thread shards in alternating rounds (medians of 4), decoded at 1 / 8 / 32 sequences
        # with fused shards 1.02 / 1.31 / 1.01x the tokens/s of grouped-GEMM shards on
        # small-mixtral and 1.06 / 1.07 / 1.06x on tiny-mixtral. (Timing one layer alone had shown
        # no consistent winner: the shard's weights then sit in cache, which favours the GEMMs.)
        self.moe_kernel = resolve_moe_kernel(moe_kernel, self._dtype, "cpu")
        model, self.weight_bytes = self._load(list(experts))
        self.shard_id = shard_id
        self.experts = tuple(experts)
        # Global id -> row here, -1 if not held. One extra entry, also -1, is what id -1 (a slot
        # another shard computes) indexes, so one lookup maps every valid id.
        self._to_local = torch.full((args.num_experts + 1,), -1, dtype=torch.long)
        self._to_local[list(experts)] = torch.arange(len(experts))
        self._layers = [block.feed_forward.experts for block in model.layers]

    def _load(self, experts: list[int]) -> tuple[ShardExperts, int]:
        with torch.device("meta"):
            model = ShardExperts(self._args, len(experts))
        model = model.to_empty(device="cpu").to(self._dtype).requires_grad_(False)
        load_weights(model, self.weights, self._args, experts=experts)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return pack_model(model, self.moe_kernel), weight_bytes

    def add_expert(self, expert: int) -> ShardInfo:
        """Loads one more expert (a replica of a hot one) for every layer; callers route tokens
        to it only after this returns."""
        if expert in self.experts:
            return self.info()
        extra, extra_bytes = self._load([expert])
        for layer, block in zip(self._layers, extra.layers):
            layer.add_experts(block.feed_forward.experts)
        self._to_local[expert] = len(self.experts)
        self.experts = (*self.experts, expert)
        self.weight_bytes += extra_bytes
        return self.info()

    def info(self) -> ShardInfo:
        return ShardInfo(self.shard_id, self.experts, self.weight_bytes, moe_kernel=self.moe_kernel)

    @torch.inference_mode()
    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This shard's part of one MoE layer for some tokens.

        x [T, D]; expert_ids [T, K] global expert ids, -1 for a slot another shard computes;
        weights [T, K] gate weights. Returns [T, D]: per token, the gate-weighted sum of the
        outputs of its experts held here (the attention side adds the shards' parts)."""
        if not 0 <= layer < len(self._layers):
            raise ValueError(f"shard {self.shard_id}: no layer {layer}")
        n_experts = self._args.num_experts
        if x.dim() != 2 or x.shape[1] != self._args.dim or expert_ids.shape != weights.shape or expert_ids.shape[0] != x.shape[0]:
            raise ValueError(f"shard {self.shard_id}: bad shapes x {list(x.shape)}, expert_ids {list(expert_ids.shape)}, "
                             f"weights {list(weights.shape)} (model dim {self._args.dim})")
        if bool(((expert_ids < -1) | (expert_ids >= n_experts)).any()):
            raise ValueError(f"shard {self.shard_id}: expert ids must lie in -1..{n_experts - 1}")
        local = self._to_local[expert_ids]
        not_here = (local < 0) & (expert_ids >= 0)
        if bool(not_here.any()):
            missing = sorted(set(expert_ids[not_here].tolist()))
            raise ValueError(f"shard {self.shard_id} does not hold experts {missing} (it holds {list(self.experts)})")
        return self._layers[layer].forward_held(x.to(self._dtype), local, weights.to(self._dtype))
