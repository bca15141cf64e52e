"""Random-weight checkpoints in the Hugging Face hub layout, for tests and the demo.

No hub is reachable here, so mixserve writes its own: config.json, model.safetensors (or
shards with model.safetensors.index.json past `shard_bytes`) and the real Mistral
SentencePiece tokenizer.model shipped by mistral-common.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixserve.model.args import ModelArgs
from mixserve.model.checkpoint import HF_INDEX, checkpoint_targets
from mixserve.replicas.tokenizer import bundled_tokenizer_path


def random_hf_tensors(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors named as in the hub layout. Projections use std 1/sqrt(fan_in) so that
    activations, attention and routing stay varied through depth (std 0.02 makes a random
    model's logits and gates nearly uniform, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in checkpoint_targets(args, "hf").items():
        if len(target.shape) == 1:  # norm weights: near 1, not exactly, so a skipped norm shows
            tensors[name] = 1.0 + 0.1 * torch.randn(target.shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            tensors[name] = torch.randn(target.shape, generator=gen)
        else:
            tensors[name] = torch.randn(target.shape, generator=gen) * target.shape[-1] ** -0.5
    return tensors


def favour_expert(tensors: dict[str, torch.Tensor], args: ModelArgs, hot: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """Skews every MoE gate toward expert `hot` (in place): the other rows shrink 100x, so about
    half the tokens pick `hot` first. Load-balancing tests and benchmarks use it."""
    gen = torch.Generator().manual_seed(seed)
    for layer in range(args.n_layers):
        gate = tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        gate.mul_(0.01)
        gate[hot] = torch.randn(args.dim, generator=gen)
    return tensors


def write_checkpoint(
    folder: str | Path,
    args: ModelArgs,
    seed: int = 0,
    shard_bytes: int = 2 * 1024**3,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else random_hf_tensors(args, seed)
    (folder / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")
    shutil.copyfile(bundled_tokenizer_path(), folder / "tokenizer.model")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder
