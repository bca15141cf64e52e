"""The decoder: embeddings, N blocks of (attention, dense or MoE feed-forward), norm, LM head.

Shape legend: T = tokens in the step, D = model dim, V = vocab, N = rows that need logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mixserve.model.args import ModelArgs
from mixserve.model.attention_backends import AttentionBackend, SdpaBackend
from mixserve.model.cache import RollingKVCache, StepMetadata
from mixserve.model.layers import Attention, DenseMLP, RMSNorm, RotaryEmbedding
from mixserve.model.moe import LocalExperts, MoeLayer, start_feed_forward
from mixserve.model.threads import intra_op_threads


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, feed_forward: nn.Module):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = feed_forward

    def forward(self, x, rope_tables, meta, cache, backend, heavy_op_threads=None, projection_threads=None):
        return self.start(x, rope_tables, meta, cache, backend, heavy_op_threads, projection_threads)()

    def start(self, x, rope_tables, meta, cache, backend, heavy_op_threads=None,
              projection_threads=None) -> Callable[[], torch.Tensor]:
        """Attention now (its projections on projection_threads intra-op threads when given);
        the feed-forward started (on heavy_op_threads when given). The returned call gives the
        block's output."""
        h = x + self.attention(self.attention_norm(x), self.layer, rope_tables, meta, cache, backend, projection_threads)
        feed_forward = start_feed_forward(self.feed_forward, self.ffn_norm(h), heavy_op_threads)
        return lambda: h + feed_forward()


@dataclass
class MicroBatch:
    """One part of a step's batch: its own tokens, metadata and logit rows (disjoint slots)."""

    tokens: torch.Tensor  # [T_i] long
    meta: StepMetadata
    logit_rows: torch.Tensor  # [N_i] long, indices into this micro-batch's tokens


def default_feed_forward(args: ModelArgs, layer: int) -> nn.Module:
    if args.is_moe:
        experts = LocalExperts(args.num_experts, args.dim, args.hidden_dim)
        return MoeLayer(args.dim, args.num_experts, args.num_experts_per_tok, experts)
    return DenseMLP(args.dim, args.hidden_dim)


class Transformer(nn.Module):
    """Mistral 7B / Mixtral 8x7B. `feed_forward_factory(args, layer)` is the seam for remote experts."""

    def __init__(self, args: ModelArgs, max_positions: int, feed_forward_factory=default_feed_forward):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, feed_forward_factory(args, i)) for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, max_positions)
        self.backend: AttentionBackend = SdpaBackend()
        # Intra-op threads for the LM head and the in-process feed-forward of every block (None:
        # the step's own count); see mixserve.model.threads.
        self.heavy_op_threads: int | None = None
        # What runs at the start of every step (remote experts latch their placement); empty in one process.
        self._step_hooks = [
            b.feed_forward.step_hook for b in self.layers if getattr(b.feed_forward, "step_hook", None) is not None
        ]

    @property
    def projection_threads(self) -> int | None:
        """heavy_op_threads for the attention projections too, when the experts are remote: the
        replica then streams only the LM head and the attention weights, and while it does the
        shards wait, so their cores are free. Measured on the 2-core CI machine, small-mixtral
        with 2 one-thread shards, 32 sequences, decoding on 1 thread with heavy_op_threads 2 and
        GOMP_SPINCOUNT=10000 (mixserve/platform/ray_env.py), alternating rounds: 0.69x the
        single-process engine's tokens/s with the LM head alone widened, 0.76x with the
        projections too. (In one process the experts dominate, and
        projections stay narrow: see mixserve.model.threads.)"""
        return self.heavy_op_threads if self._step_hooks else None

    def forward(
        self,
        tokens: torch.Tensor,  # [T] long
        meta: StepMetadata,
        cache: RollingKVCache,
        logit_rows: torch.Tensor,  # [N] long: which of the T positions need logits
    ) -> torch.Tensor:  # [N, V] float32
        self._begin_step()
        h = self.tok_embeddings(tokens)  # [T, D]
        rope_tables = self.rope.tables(meta.positions)  # once per step, shared by every layer
        projection_threads = self.projection_threads
        for block in self.layers:
            h = block(h, rope_tables, meta, cache, self.backend, self.heavy_op_threads, projection_threads)
        return self._logits(h, logit_rows)

    def forward_micro_batches(self, batches: list[MicroBatch], cache: RollingKVCache) -> torch.Tensor:
        """Ping-pong (MegaScale-Infer): at each layer, micro-batch i's attention runs while the
        experts of micro-batch i-1 compute on the shards. Same math as forward() on each part;
        returns the logits of every part, concatenated in order ([sum N_i, V] float32)."""
        self._begin_step()
        hs = [self.tok_embeddings(b.tokens) for b in batches]  # [T_i, D] each
        tables = [self.rope.tables(b.meta.positions) for b in batches]
        pending: list[Callable[[], torch.Tensor] | None] = [None] * len(batches)
        projection_threads = self.projection_threads
        for block in self.layers:
            for i, b in enumerate(batches):
                if pending[i] is not None:
                    hs[i] = pending[i]()  # waits for this part's experts of the previous layer
                pending[i] = block.start(hs[i], tables[i], b.meta, cache, self.backend, self.heavy_op_threads,
                                         projection_threads)
        return torch.cat([self._logits(finish(), b.logit_rows) for finish, b in zip(pending, batches)])

    def _begin_step(self) -> None:
        for hook in self._step_hooks:
            hook()

    def _logits(self, h: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        if logit_rows.numel() == 0:  # a mid-prompt chunk: nothing to sample, skip the LM head
            return h.new_empty(0, self.args.vocab_size, dtype=torch.float32)
        h = self.norm(h.index_select(0, logit_rows))  # the LM head only runs where logits are used
        with intra_op_threads(self.heavy_op_threads):
            return self.output(h).float()
