"""Weights repacked after loading into column blocks, for fast matmuls on CPUs.

Why: decode multiplies a few rows of activations by large weight matrices, so it is bound by
how fast the weights stream from memory. Measured on this project's 2-core AMD EPYC CI
machine (float32, see benchmarks/RESULTS.md): F.linear on an [out, in] weight reads
7 to 16 GB/s, x @ W^T stored as [in, out] about 20 GB/s, and column blocks [nb, in, bs]
through one bmm 25 to 30 GB/s at batch 1 and 1.5 to 2x F.linear at batches 8 to 32.
Each block's panel stays in cache while all rows of x use it, and bmm spreads the blocks
over the cores.

Shape legend: T = rows of x, I = in features, O = out features, nb = blocks, bs = block width.
Checkpoint loading keeps the usual [O, I] layout (names and slices stay simple); `pack_model`
then converts every projection once.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_BLOCK = 2048


def block_width(out_features: int, max_block: int = MAX_BLOCK) -> int:
    """The largest divisor of out_features not above max_block (at least 1)."""
    if out_features <= max_block:
        return out_features
    for width in range(max_block, 0, -1):
        if out_features % width == 0:
            return width
    return out_features


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[..., O, I] -> [..., nb, I, bs]: block j holds output columns j*bs .. (j+1)*bs - 1."""
    *lead, out_f, in_f = weight.shape
    bs = block_width(out_f)
    blocks = weight.reshape(*lead, out_f // bs, bs, in_f).transpose(-1, -2)
    return blocks.contiguous()


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [T, I] @ packed [nb, I, bs] -> [T, nb*bs]; the same result as F.linear(x, weight)."""
    nb, in_f, bs = packed.shape
    if nb == 1:
        return torch.mm(x, packed[0])
    out = torch.bmm(x.unsqueeze(0).expand(nb, -1, -1), packed)  # [nb, T, bs]
    return out.transpose(0, 1).reshape(x.shape[0], nb * bs)


class PackedLinear(nn.Module):
    """A bias-free nn.Linear whose weight lives in the packed layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = nn.Parameter(pack(linear.weight.detach()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_matmul(x, self.packed)


def pack_model(model: nn.Module) -> nn.Module:
    """Replaces every bias-free nn.Linear by a PackedLinear and asks modules with stacked
    weights (experts) to pack themselves. Call once, after the weights are loaded."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(model, name, PackedLinear(child))
        else:
            pack_model(child)
    if hasattr(model, "pack_weights"):
        model.pack_weights()
    return model
