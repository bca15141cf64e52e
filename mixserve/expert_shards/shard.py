"""An expert shard: some of the experts of every MoE layer, and the compute for their tokens.

`ExpertShard` is a plain class so that tests and the in-process transport can use it
directly; `mixserve.expert_shards.actors` wraps it as a Ray actor. It reads only its own
experts' tensors from the checkpoint and runs token groups through the same dropless grouped
compute as the single-process engine (`LocalExperts.run_groups`), so results match bit for bit.
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


class ExpertShard:
    def __init__(self, shard_id: int, checkpoint: str | Path | WeightsSource, experts: list[int], dtype: str = "float32"):
        # One source for the shard's life: a remote one keeps its headers for add_expert.
        self.weights = as_weights_source(checkpoint)
        args = ModelArgs.from_folder(self.weights.folder())
        if not args.is_moe:
            raise CheckpointError(f"{self.weights.describe()} is a dense model: it has no experts to shard")
        bad = [e for e in experts if not 0 <= e < args.num_experts]
        if bad or not experts:
            raise ValueError(f"shard {shard_id}: experts {experts} must be a non-empty subset of 0..{args.num_experts - 1}")
        self._args, self._dtype = args, DTYPES[dtype]
        model, self.weight_bytes = self._load(list(experts))
        self.shard_id = shard_id
        self.experts = tuple(experts)
        self._local = {e: j for j, e in enumerate(experts)}
        self._layers = [block.feed_forward.experts for block in model.layers]

    def _load(self, experts: list[int]) -> tuple[ShardExperts, int]:
        with torch.device("meta"):
            model = ShardExperts(self._args, len(experts))
        model = model.to_empty(device="cpu").to(self._dtype).requires_grad_(False)
        load_weights(model, self.weights, self._args, experts=experts)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return pack_model(model), weight_bytes

    def add_expert(self, expert: int) -> ShardInfo:
        """Loads one more expert (a replica of a hot one) for every layer; callers route tokens
        to it only after this returns."""
        if expert in self._local:
            return self.info()
        extra, extra_bytes = self._load([expert])
        for layer, block in zip(self._layers, extra.layers):
            layer.packed.append(block.feed_forward.experts.packed[0])
            layer.num_experts += 1
        self._local[expert] = len(self.experts)
        self.experts = (*self.experts, expert)
        self.weight_bytes += extra_bytes
        return self.info()

    def info(self) -> ShardInfo:
        return ShardInfo(self.shard_id, self.experts, self.weight_bytes)

    @torch.inference_mode()
    def compute(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor) -> torch.Tensor:
        """x [A, D]: the rows of each listed expert, grouped in that order with those counts.
        Returns the unweighted expert outputs [A, D] in the same order."""
        missing = [e for e in experts if e not in self._local]
        if missing:
            raise ValueError(f"shard {self.shard_id} does not hold experts {missing} (it holds {list(self.experts)})")
        if not 0 <= layer < len(self._layers):
            raise ValueError(f"shard {self.shard_id}: no layer {layer}")
        segments, start = [], 0
        for expert, n in zip(experts, counts):
            segments.append((self._local[expert], start, start + n))
            start += n
        return self._layers[layer].run_groups(x.to(self._dtype), segments)
