"""RMSNorm, rotary embeddings, grouped-query attention and the dense SwiGLU MLP.

Shape legend: T = tokens in the step (all sequences flattened), D = model dim,
H = query heads, KV = key/value heads, Dh = head dim, I = feed-forward hidden dim.
Projections are fused at load time (wq|wk|wv -> wqkv, w1|w3 -> w13) so each costs one matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.model.args import ModelArgs
from mixserve.model.attention_backends import AttentionBackend
from mixserve.model.cache import RollingKVCache, StepMetadata
from mixserve.model.threads import intra_op_threads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # Lower precision: normalise in float32, cast, then scale, as the reference does.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the Hugging Face half-rotation layout (checkpoints in Mistral's interleaved
    layout have wq/wk permuted at load time, so the forward pass has one convention).

    rotate_half(x) * sin == roll(x, Dh/2) * [-sin | sin]: the sign is folded into the table, so
    applying RoPE costs a roll and two multiply-adds.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, Dh/2]
        self.register_buffer("cos", torch.cat([angles, angles], dim=-1).cos(), persistent=False)  # [P, Dh]
        self.register_buffer("signed_sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for the step's positions, [T, 1, Dh]; gathered once per step."""
        return self.cos[positions][:, None, :], self.signed_sin[positions][:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [T, heads, Dh]
        cos, signed_sin = tables
        x32 = x.float()
        rotated = torch.addcmul(x32 * cos, x32.roll(x.shape[-1] // 2, dims=-1), signed_sin)
        return rotated.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.qk_size = q_size + kv_size
        self.wqkv = nn.Linear(args.dim, q_size + 2 * kv_size, bias=False)
        self.wo = nn.Linear(q_size, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        layer: int,
        rope_tables: tuple[torch.Tensor, torch.Tensor],
        meta: StepMetadata,
        cache: RollingKVCache,
        backend: AttentionBackend,
        projection_threads: int | None = None,  # intra-op threads for wqkv and wo (None: the caller's)
    ) -> torch.Tensor:
        t = x.shape[0]
        with intra_op_threads(projection_threads):
            qkv = self.wqkv(x)  # [T, (H + 2 KV) * Dh]
        # q and k sit side by side in the fused output: rotate both with one RoPE call.
        qk = RotaryEmbedding.apply(qkv[:, : self.qk_size].view(t, -1, self.head_dim), rope_tables)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]  # [T, H, Dh], [T, KV, Dh]
        v = qkv[:, self.qk_size :].view(t, self.n_kv_heads, self.head_dim)
        out = backend(layer, q, k, v, meta, cache)  # [T, H, Dh]
        with intra_op_threads(projection_threads):
            return self.wo(out.reshape(t, -1))


class DenseMLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into w13."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # [T, I] each
        return self.w2(F.silu(gate) * up)
