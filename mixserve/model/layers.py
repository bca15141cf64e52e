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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weight dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the Hugging Face half-rotation layout (checkpoints in Mistral's interleaved
    layout have wq/wk permuted at load time, so the forward pass has one convention)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, Dh/2]
        table = torch.cat([angles, angles], dim=-1)  # [P, Dh]
        self.register_buffer("cos", table.cos(), persistent=False)
        self.register_buffer("sin", table.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, Dh]; positions: [T]
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.wqkv = nn.Linear(args.dim, q_size + 2 * kv_size, bias=False)
        self.wo = nn.Linear(q_size, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        layer: int,
        rope: RotaryEmbedding,
        meta: StepMetadata,
        cache: RollingKVCache,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = rope(q.view(t, self.n_heads, self.head_dim), meta.positions)  # [T, H, Dh]
        k = rope(k.view(t, self.n_kv_heads, self.head_dim), meta.positions)  # [T, KV, Dh]
        v = v.view(t, self.n_kv_heads, self.head_dim)
        out = backend(layer, q, k, v, meta, cache)  # [T, H, Dh]
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
