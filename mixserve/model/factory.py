"""Building a `Transformer` without paying for random initialisation, then filling it."""

from __future__ import annotations

from pathlib import Path

import torch

from mixserve.model.args import ModelArgs
from mixserve.model.checkpoint import load_weights
from mixserve.model.layers import RotaryEmbedding
from mixserve.model.moe_kernels import resolve_moe_kernel
from mixserve.model.packed import pack_model
from mixserve.model.transformer import Transformer, default_feed_forward
from mixserve.model.weights_source import WeightsSource, as_weights_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def create_model(
    args: ModelArgs,
    max_positions: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    feed_forward_factory=default_feed_forward,
) -> Transformer:
    """An uninitialised model (parameters hold garbage until weights are loaded)."""
    with torch.device("meta"):
        model = Transformer(args, max_positions, feed_forward_factory)
    model = model.to_empty(device=device).to(dtype)
    # RoPE tables are computed, not loaded: rebuild them for real (and in float32) after to_empty.
    model.rope = RotaryEmbedding(args.head_dim, args.rope_theta, max_positions).to(device)
    return model.eval().requires_grad_(False)


def load_model(
    checkpoint: str | Path | WeightsSource,
    max_positions: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    feed_forward_factory=default_feed_forward,
    moe_kernel: str = "torch",
) -> Transformer:
    """The model from a checkpoint, weights loaded and prepared. moe_kernel: 'torch' (grouped
    oneDNN GEMMs), 'zentorch' (one fused kernel a layer, see mixserve.model.moe_kernels) or 'auto'."""
    source = as_weights_source(checkpoint)
    args = ModelArgs.from_folder(source.folder())
    model = create_model(args, max_positions or args.max_position_embeddings, dtype, device, feed_forward_factory)
    load_weights(model, source, args)
    return pack_model(model, resolve_moe_kernel(moe_kernel, dtype, device) if args.is_moe else "torch")
