"""Weights prepacked once after loading, for fast matmuls with few activation rows on CPUs.

Why: decode multiplies a handful of rows by large weights, and each expert sees only the few
tokens routed to it, so CPU speed hinges on small-M GEMM. Measured on this project's 2-core
AMD EPYC CI machine in float32 (T = rows): for a 1024 -> 5632 expert projection, F.linear takes
1.7 ms at T=1 and 2.9 ms at T=8; a column-blocked bmm layout 0.8 and 1.6 ms; oneDNN's
`_linear_pointwise` on a weight reordered by `_reorder_linear_weight` 0.66 (padded to 4 rows,
below) and 0.8 ms (and 0.35 vs 1.2 ms for 2816 -> 1024 at T=8). It is the same kernel path torch.compile's CPU
backend (Inductor) emits for linear layers. bfloat16 goes through it too (2.6x F.linear here).

The oneDNN ops are private torch ops, so packing probes them once and falls back to the plain
[O, I] layout with F.linear (also the path on GPUs) if they are missing or disagree.
Shape legend: T = rows of x, I = in features, O = out features.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# Layout hint for the reorder: 8 rows measured best over T = 1..100 (a hint of 1 is 2x slower at T >= 8).
ROWS_HINT = 8
# oneDNN picks a slower kernel for 1 or 2 rows than for 4: padding with zero rows costs a few KB and
# saves a quarter to a third on weights that stream from memory (1024 -> 32000: 4.7 ms at T=1, 3.1 at T=4).
# Weights that stay in cache gain nothing, so only those of PAD_FROM_BYTES or more are padded.
MIN_ROWS = 4
PAD_FROM_BYTES = 4 << 20
# Narrow outputs (the MoE gate's 8 logits) gain nothing from packing: 66 us a call through oneDNN
# against a few us through F.linear.
MIN_PACKED_OUT = 64


@lru_cache(maxsize=None)
def onednn_linear_works(dtype: torch.dtype) -> bool:
    """True if this torch build has the oneDNN prepacked linear and it gives F.linear's result."""
    try:
        weight = torch.randn(24, 16).to(dtype)
        x = torch.randn(3, 16).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.allclose(got.float(), F.linear(x, weight).float(), atol=1e-2, rtol=1e-2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class PackedWeight:
    """One [O, I] weight, prepacked for oneDNN when that works here, else kept as it is."""

    def __init__(self, weight: torch.Tensor):
        weight = weight.detach().contiguous()
        self.out_features = weight.shape[0]
        self.onednn = (
            weight.device.type == "cpu" and self.out_features >= MIN_PACKED_OUT and onednn_linear_works(weight.dtype)
        )
        self.pad_rows = weight.numel() * weight.element_size() >= PAD_FROM_BYTES
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT) if self.onednn else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [T, I] -> [T, O]
        if not self.onednn:
            return F.linear(x, self.weight)
        rows = x.shape[0]
        if rows == 0:
            return x.new_empty(0, self.out_features)
        padded = self.pad_rows and rows < MIN_ROWS
        if padded:
            x = torch.cat([x, x.new_zeros(MIN_ROWS - rows, x.shape[1])])
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, None, "none", [], "")
        return out[:rows] if padded else out


class PackedLinear(nn.Module):
    """A bias-free nn.Linear whose weight is a PackedWeight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = PackedWeight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x)


def pack_model(model: nn.Module, moe_kernel: str = "torch") -> nn.Module:
    """Replaces every bias-free nn.Linear by a PackedLinear and asks modules with stacked
    weights (experts) to prepare themselves for `moe_kernel` ('torch' or 'zentorch', already
    resolved). Call once, after the weights are loaded."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(model, name, PackedLinear(child))
        else:
            pack_model(child, moe_kernel)
    if hasattr(model, "pack_weights"):
        model.pack_weights(moe_kernel)
    return model
