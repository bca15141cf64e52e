"""Named model shapes: tiny random-weight demos for tests and the real papers' shapes for planning."""

from __future__ import annotations

from dataclasses import replace

from mixserve.model.args import ModelArgs

_TINY = dict(
    vocab_size=32000,
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    head_dim=32,
    hidden_dim=512,
    rope_theta=1e6,
    sliding_window=64,  # small so that the rolling cache wraps in every test and demo
    max_position_embeddings=4096,
)

# Shapes from the Mistral 7B (arXiv 2310.06825) and Mixtral (arXiv 2401.04088) papers.
_PAPER = dict(
    vocab_size=32000,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    hidden_dim=14336,
)

PRESETS: dict[str, ModelArgs] = {
    "tiny-mixtral": ModelArgs(**_TINY, num_experts=8, num_experts_per_tok=2),
    "tiny-mistral": ModelArgs(**_TINY),
    "small-mixtral": ModelArgs(
        vocab_size=32000,
        dim=1024,
        n_layers=8,
        n_heads=16,
        n_kv_heads=4,
        head_dim=64,
        hidden_dim=2816,
        rope_theta=1e6,
        sliding_window=None,
        max_position_embeddings=32768,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "mixtral-8x7b": ModelArgs(
        **_PAPER, rope_theta=1e6, sliding_window=None, max_position_embeddings=32768, num_experts=8
    ),
    "mistral-7b": ModelArgs(**_PAPER, rope_theta=10000.0, sliding_window=4096, max_position_embeddings=32768),
}

# Config-only presets: their weights (tens of GB) are never generated here.
CONFIG_ONLY = frozenset({"mixtral-8x7b", "mistral-7b"})


def preset(name: str, **overrides) -> ModelArgs:
    """The named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)
