"""Sparse mixture of SwiGLU experts: top-k gating and dropless grouped expert compute.

Shape legend: T = tokens, D = model dim, I = expert hidden dim, E = experts, K = experts per
token (2 for Mixtral), A = T*K token-expert assignments.

    y = sum_k softmax(topk(x W_g))_k * SwiGLU_{e_k}(x)

The experts are injected (`MoeLayer(gate, experts)`): in one process they are `LocalExperts`;
in the disaggregated topology the same seam calls expert shards in other processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.model.moe_kernels import fused_moe
from mixserve.model.packed import PackedWeight
from mixserve.model.threads import intra_op_threads


class Experts(Protocol):
    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, K] long, weights [T, K] -> [T, D] weighted sum of expert outputs."""
        ...


def top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: logits [T, E] -> (weights [T, K] float32, expert_ids [T, K]).

    Softmax over all logits then renormalising the top k equals softmax over the k kept
    logits; this order matches the reference bit for bit, ties included.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_ids = torch.topk(probs, k, dim=-1)
    return top_w / top_w.sum(dim=-1, keepdim=True), top_ids


@dataclass
class Routing:
    """Token-expert assignments grouped by expert (computed once per MoE layer per step)."""

    token_index: torch.Tensor  # [A] long: source token of each assignment, grouped by expert
    weights: torch.Tensor  # [A]: gate weight of each assignment, same order
    counts: list[int]  # [E]: assignments per expert; expert e owns a contiguous run

    def segments(self):
        """Yields (expert, start, end) over the grouped assignments of each active expert."""
        start = 0
        for expert, n in enumerate(self.counts):
            if n:
                yield expert, start, start + n
                start += n


def group_by_expert(expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Routing:
    """Groups the assignments by expert. An id of -1 marks a slot computed elsewhere (an expert
    shard gets only the slots it holds): it is left out, and its token keeps its other slots."""
    flat = expert_ids.reshape(-1)  # [A]
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # [E + 1]: first the skipped
    order = torch.argsort(flat, stable=True)[counts[0]:]  # -1 sorts first
    k = expert_ids.shape[1]
    return Routing(token_index=order // k, weights=weights.reshape(-1)[order], counts=counts[1:])


def swiglu_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on its token group: x [n, D], w13 [2I, D], w2 [D, I] -> [n, D]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def packed_swiglu_expert(x: torch.Tensor, w13: PackedWeight, w2: PackedWeight) -> torch.Tensor:
    """swiglu_expert on prepacked weights (see mixserve.model.packed)."""
    gate, up = w13(x).chunk(2, dim=-1)
    return w2(F.silu(gate) * up)


def combine(outputs: torch.Tensor, routing: Routing, n_tokens: int) -> torch.Tensor:
    """Weighted scatter-add of grouped expert outputs [A, D] back to tokens [T, D]."""
    weighted = outputs * routing.weights[:, None].to(outputs.dtype)
    result = torch.zeros(n_tokens, outputs.shape[1], dtype=outputs.dtype, device=outputs.device)
    return result.index_add_(0, routing.token_index, weighted)


class LocalExperts(nn.Module):
    """All E experts of one layer in this process, stacked: w13 [E, 2I, D], w2 [E, D, I].

    Dropless: every assignment is computed, one matmul pair per active expert, so no token is
    ever dropped for capacity whatever the routing skew.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.packed: list[tuple[PackedWeight, PackedWeight]] | None = None
        self.fused = False  # the whole layer in one library kernel (mixserve.model.moe_kernels)
        # The fused kernel's (w13, w2), read once per call: a shard adding an expert swaps in a new
        # pair while its channel thread may be inside the kernel, which keeps the old pair alive
        # (and never sees a new w13 beside an old w2) through this one reference.
        self.fused_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_moe(x, *self.fused_weights, expert_ids, weights)
        if x.shape[0] == 1 and self.packed is not None:
            # One token (batch-1 decode): no grouping needed, and every saved op shows at this size.
            out = None
            for expert, weight in zip(expert_ids[0].tolist(), weights[0]):
                if expert >= 0:
                    y = packed_swiglu_expert(x, *self.packed[expert]) * weight
                    out = y if out is None else out + y
            return out if out is not None else torch.zeros_like(x)
        routing = group_by_expert(expert_ids, weights, self.num_experts)
        grouped_x = x[routing.token_index]  # [A, D]
        outputs = self.run_groups(grouped_x, list(routing.segments()))
        return combine(outputs, routing, x.shape[0])

    def forward_held(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """forward on an expert shard's share: x [T, D], expert_ids [T, K] with -1 for each slot
        held by another shard -> [T, D], per token the weighted sum over its slots here (zero
        for a token with none). The caller adds the shards' parts."""
        if not self.fused:
            return self.forward(x, expert_ids, weights)  # the grouped path skips -1 slots itself
        w13, w2 = self.fused_weights  # [E, 2I, D], [E, D, I]
        held = expert_ids >= 0
        weights = weights.masked_fill(~held, 0)
        n_active = int(torch.bincount(expert_ids.reshape(-1) + 1, minlength=self.num_experts + 1)[1:].count_nonzero())
        if n_active == 0:
            return torch.zeros_like(x)
        if n_active == 1:
            # zentorch's fused kernel refuses a single active expert (it happens on a shard
            # when each token has one slot here): one plain SwiGLU, each row weighted by its slot.
            expert = int(expert_ids.max())
            return swiglu_expert(x, w13[expert], w2[expert]) * weights.sum(dim=1, keepdim=True)
        # The fused kernel takes exactly K ids per row: a slot held elsewhere repeats an expert
        # active here with weight 0, which adds exactly nothing and costs one extra GEMM row on
        # weights that stream from memory anyway.
        row_max = expert_ids.max(dim=1, keepdim=True).values  # [T, 1]: a slot of the row held here, else -1
        fill = torch.where(row_max >= 0, row_max, expert_ids.max())
        return fused_moe(x, w13, w2, torch.where(held, expert_ids, fill), weights)

    def add_experts(self, other: LocalExperts) -> None:
        """Appends other's experts (prepared the same way) after this layer's own."""
        if self.fused:
            # New tensors, then swapped in as one pair: a concurrent forward uses the old or the
            # new pair, and no id reaches the new rows before the caller publishes them.
            w13, w2 = torch.cat([self.w13.data, other.w13.data]), torch.cat([self.w2.data, other.w2.data])
            self.fused_weights = (w13, w2)
            self.w13.data, self.w2.data = w13, w2
        else:
            self.packed = [*self.packed, *other.packed]
        self.num_experts += other.num_experts

    def run_groups(self, grouped_x: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """Unweighted expert outputs for token groups: rows start..end of grouped_x go through
        expert e for each (e, start, end). Expert shards call this with their own groups."""
        outputs = torch.empty_like(grouped_x)
        if self.fused:
            raise RuntimeError("run_groups is the grouped path; this layer was prepared for a fused kernel")
        for expert, start, end in segments:
            group = grouped_x[start:end]
            if self.packed is not None:
                outputs[start:end] = packed_swiglu_expert(group, *self.packed[expert])
            else:
                outputs[start:end] = swiglu_expert(group, self.w13[expert], self.w2[expert])
        return outputs

    def pack_weights(self, moe_kernel: str = "torch") -> None:
        """Prepares the weights once, after loading: kept stacked for a fused kernel, else each
        expert's w13 and w2 prepacked for oneDNN (and the stacked copies dropped)."""
        if moe_kernel == "zentorch":
            self.w13.data, self.w2.data = self.w13.data.contiguous(), self.w2.data.contiguous()
            self.fused_weights = (self.w13.data, self.w2.data)
            self.fused = True
            return
        self.packed = [(PackedWeight(self.w13[e]), PackedWeight(self.w2[e])) for e in range(self.num_experts)]
        del self.w13, self.w2


class MoeLayer(nn.Module):
    def __init__(self, dim: int, num_experts: int, k: int, experts: Experts):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.k = k
        self.experts = experts
        # Remote experts start asynchronously and latch a placement per step; local ones do
        # neither. Looked up once here rather than on every layer of every step.
        self._start_remote = getattr(experts, "start", None)
        self.step_hook = getattr(experts, "begin_step", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.start(x)()

    def start(self, x: torch.Tensor, local_threads: int | None = None) -> Callable[[], torch.Tensor]:
        """Gates x [T, D] and starts the experts; the returned call gives the [T, D] output.
        Remote experts return before the shards finish (ping-pong overlaps that wait with
        another micro-batch's attention); local ones compute here, on local_threads intra-op
        threads when given (mixserve.model.threads)."""
        weights, expert_ids = top_k_gating(self.gate(x), self.k)
        if self._start_remote is not None:
            return self._start_remote(x, expert_ids, weights.to(x.dtype))
        with intra_op_threads(local_threads):
            y = self.experts(x, expert_ids, weights.to(x.dtype))
        return lambda: y


def start_feed_forward(feed_forward: nn.Module, x: torch.Tensor, local_threads: int | None = None) -> Callable[[], torch.Tensor]:
    """Starts any feed-forward (MoE or dense) the way MoeLayer.start does."""
    if isinstance(feed_forward, MoeLayer):
        return feed_forward.start(x, local_threads)
    with intra_op_threads(local_threads):
        y = feed_forward(x)
    return lambda: y
