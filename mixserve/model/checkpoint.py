"""Reading safetensors checkpoints into a `Transformer`, by an explicit name table.

Three layouts are understood, all mapped onto the same fused parameters:
  * Hugging Face hub layout (what MistralForCausalLM / MixtralForCausalLM checkpoints hold):
    model.layers.{i}.self_attn.q_proj.weight, ...block_sparse_moe.experts.{e}.w1.weight
  * transformers >= 5 fused-expert layout: ...mlp.experts.gate_up_proj [E, 2I, D]
  * Mistral's consolidated layout: layers.{i}.attention.wq.weight, feed_forward.experts.{e}.w1
    (with wq/wk in the interleaved RoPE convention, permuted here to the half-rotation one)

Every checkpoint tensor has one `TensorTarget` saying which parameter, which slice of it,
and what shape it must have. Missing, unexpected and mis-shaped tensors are all reported
together, before any tensor is read. The bytes come from a `WeightsSource` (a local folder
here; an object store through mixserve.platform), which is asked for exactly the tensors the
model being filled holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mixserve.errors import CheckpointError
from mixserve.model.args import ModelArgs
from mixserve.model.weights_source import HF_INDEX, PICKLE_SUFFIXES, WeightsSource, as_weights_source

__all__ = ["HF_INDEX", "PICKLE_SUFFIXES", "TensorTarget", "checkpoint_targets", "detect_layout", "load_weights", "select_experts"]


@dataclass(frozen=True)
class TensorTarget:
    param: str  # parameter name inside Transformer
    index: tuple  # where in that parameter this tensor goes (() = the whole parameter)
    shape: tuple[int, ...]  # the shape the checkpoint tensor must have
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    expert: int | None = None  # for one expert's tensor: which expert (its index[0] in the stack)


def _rope_interleaved_to_half(n_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mistral stores q/k rows as (re, im) pairs per frequency; the half layout stores all re
    then all im per head. Same permutation Hugging Face applies when converting."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    return permute


def checkpoint_targets(args: ModelArgs, layout: str) -> dict[str, TensorTarget]:
    """The table from checkpoint names to parameters, for layout 'hf', 'hf-fused' or 'consolidated'."""
    d, hd, i_dim, e = args.dim, args.head_dim, args.hidden_dim, args.num_experts
    q_rows, kv_rows = args.n_heads * hd, args.n_kv_heads * hd
    qkv = {"q": (slice(0, q_rows),), "k": (slice(q_rows, q_rows + kv_rows),), "v": (slice(q_rows + kv_rows, None),)}
    gate_half, up_half = (slice(0, i_dim),), (slice(i_dim, None),)
    t: dict[str, TensorTarget] = {}
    hf = layout in ("hf", "hf-fused")
    if hf:
        t["model.embed_tokens.weight"] = TensorTarget("tok_embeddings.weight", (), (args.vocab_size, d))
        t["model.norm.weight"] = TensorTarget("norm.weight", (), (d,))
        if not args.tie_word_embeddings:
            t["lm_head.weight"] = TensorTarget("output.weight", (), (args.vocab_size, d))
    else:
        t["tok_embeddings.weight"] = TensorTarget("tok_embeddings.weight", (), (args.vocab_size, d))
        t["norm.weight"] = TensorTarget("norm.weight", (), (d,))
        t["output.weight"] = TensorTarget("output.weight", (), (args.vocab_size, d))

    for n in range(args.n_layers):
        ours = f"layers.{n}"
        attn, ff = f"{ours}.attention", f"{ours}.feed_forward"
        if hf:
            src = f"model.layers.{n}"
            t[f"{src}.input_layernorm.weight"] = TensorTarget(f"{ours}.attention_norm.weight", (), (d,))
            t[f"{src}.post_attention_layernorm.weight"] = TensorTarget(f"{ours}.ffn_norm.weight", (), (d,))
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                t[f"{src}.self_attn.{name}_proj.weight"] = TensorTarget(f"{attn}.wqkv.weight", qkv[name], (rows, d))
            t[f"{src}.self_attn.o_proj.weight"] = TensorTarget(f"{attn}.wo.weight", (), (d, q_rows))
            if not args.is_moe:
                t[f"{src}.mlp.gate_proj.weight"] = TensorTarget(f"{ff}.w13.weight", gate_half, (i_dim, d))
                t[f"{src}.mlp.up_proj.weight"] = TensorTarget(f"{ff}.w13.weight", up_half, (i_dim, d))
                t[f"{src}.mlp.down_proj.weight"] = TensorTarget(f"{ff}.w2.weight", (), (d, i_dim))
            elif layout == "hf-fused":
                t[f"{src}.mlp.gate.weight"] = TensorTarget(f"{ff}.gate.weight", (), (e, d))
                t[f"{src}.mlp.experts.gate_up_proj"] = TensorTarget(f"{ff}.experts.w13", (), (e, 2 * i_dim, d))
                t[f"{src}.mlp.experts.down_proj"] = TensorTarget(f"{ff}.experts.w2", (), (e, d, i_dim))
            else:
                moe = f"{src}.block_sparse_moe"
                t[f"{moe}.gate.weight"] = TensorTarget(f"{ff}.gate.weight", (), (e, d))
                for x in range(e):
                    _expert_targets(t, f"{moe}.experts.{x}", ff, x, d, i_dim)
        else:
            t[f"{ours}.attention_norm.weight"] = TensorTarget(f"{ours}.attention_norm.weight", (), (d,))
            t[f"{ours}.ffn_norm.weight"] = TensorTarget(f"{ours}.ffn_norm.weight", (), (d,))
            t[f"{attn}.wq.weight"] = TensorTarget(
                f"{attn}.wqkv.weight", qkv["q"], (q_rows, d), _rope_interleaved_to_half(args.n_heads, hd)
            )
            t[f"{attn}.wk.weight"] = TensorTarget(
                f"{attn}.wqkv.weight", qkv["k"], (kv_rows, d), _rope_interleaved_to_half(args.n_kv_heads, hd)
            )
            t[f"{attn}.wv.weight"] = TensorTarget(f"{attn}.wqkv.weight", qkv["v"], (kv_rows, d))
            t[f"{attn}.wo.weight"] = TensorTarget(f"{attn}.wo.weight", (), (d, q_rows))
            if args.is_moe:
                t[f"{ff}.gate.weight"] = TensorTarget(f"{ff}.gate.weight", (), (e, d))
                for x in range(e):
                    _expert_targets(t, f"{ff}.experts.{x}", ff, x, d, i_dim)
            else:
                t[f"{ff}.w1.weight"] = TensorTarget(f"{ff}.w13.weight", gate_half, (i_dim, d))
                t[f"{ff}.w3.weight"] = TensorTarget(f"{ff}.w13.weight", up_half, (i_dim, d))
                t[f"{ff}.w2.weight"] = TensorTarget(f"{ff}.w2.weight", (), (d, i_dim))
    return t


def _expert_targets(t: dict[str, TensorTarget], src: str, ff: str, expert: int, d: int, i_dim: int) -> None:
    w13, w2 = f"{ff}.experts.w13", f"{ff}.experts.w2"
    t[f"{src}.w1.weight"] = TensorTarget(w13, (expert, slice(0, i_dim)), (i_dim, d), expert=expert)
    t[f"{src}.w3.weight"] = TensorTarget(w13, (expert, slice(i_dim, None)), (i_dim, d), expert=expert)
    t[f"{src}.w2.weight"] = TensorTarget(w2, (expert,), (d, i_dim), expert=expert)


def select_experts(targets: dict[str, TensorTarget], experts: list[int]) -> dict[str, TensorTarget]:
    """Keeps only the listed experts' tensors (plus everything that is not an expert's), and
    re-indexes them into a stack of len(experts): experts[j] lands at index j. The fused
    transformers-5 layout stores all experts in one tensor and cannot be split this way."""
    local = {e: j for j, e in enumerate(experts)}
    kept = {}
    for name, tgt in targets.items():
        if tgt.expert is None:
            if tgt.param.endswith((".experts.w13", ".experts.w2")):
                raise CheckpointError(
                    "this checkpoint stores all experts of a layer in one tensor (transformers >= 5 layout); "
                    "expert shards need one tensor per expert (the hub layout or Mistral's)"
                )
            kept[name] = tgt
        elif tgt.expert in local:
            kept[name] = replace(tgt, index=(local[tgt.expert], *tgt.index[1:]), expert=local[tgt.expert])
    return kept


def detect_layout(names: Iterable[str]) -> str:
    names = set(names)
    if "model.embed_tokens.weight" in names or any(n.startswith("model.layers.") for n in names):
        return "hf-fused" if any(n.endswith(".mlp.experts.gate_up_proj") for n in names) else "hf"
    if "tok_embeddings.weight" in names or any(n.startswith("layers.") for n in names):
        return "consolidated"
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise CheckpointError(
        "unknown checkpoint layout: expected Hugging Face names (model.embed_tokens.weight, "
        f"model.layers.N...) or Mistral consolidated names (tok_embeddings.weight, layers.N...); found {sample}"
    )


# ---- loading ----------------------------------------------------------------------------


def load_weights(
    model: torch.nn.Module,
    checkpoint: str | Path | WeightsSource,
    args: ModelArgs,
    experts: list[int] | None = None,
) -> set[str]:
    """Copies the checkpoint into `model`'s parameters; returns the checkpoint names loaded.

    Only the parameters `model` has are read, so a module holding a subset (an attention
    replica without experts, say) reads only its bytes. With `experts`, only those experts'
    tensors are read, stacked in that order (an expert shard). Every problem is reported at once.
    """
    source = as_weights_source(checkpoint)
    shapes = source.tensor_shapes()
    all_targets = checkpoint_targets(args, detect_layout(shapes))
    targets = select_experts(all_targets, experts) if experts is not None else all_targets
    params = dict(model.named_parameters())
    wanted = {name: tgt for name, tgt in targets.items() if tgt.param in params}
    # Nothing is read from a checkpoint that is already known not to fit (it may be remote and large).
    readable = _check(source, shapes, all_targets, wanted, args)

    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in source.read_tensors(readable):
            tgt = wanted[name]
            if tgt.transform is not None:
                tensor = tgt.transform(tensor)
            param = params[tgt.param]
            (param[tgt.index] if tgt.index else param).copy_(tensor)
            loaded.add(name)
    if args.tie_word_embeddings and "output.weight" in params:
        params["output.weight"].data = params["tok_embeddings.weight"].data
    return loaded


def check_checkpoint(checkpoint: str | Path | WeightsSource, args: ModelArgs) -> None:
    """Every tensor's name and shape against `args`, from the files' headers alone (nothing else
    is read): what a deployment checks before it starts any actor. Every problem at once."""
    source = as_weights_source(checkpoint)
    shapes = source.tensor_shapes()
    targets = checkpoint_targets(args, detect_layout(shapes))
    _check(source, shapes, targets, targets, args)


def _check(source: WeightsSource, shapes: dict[str, tuple[int, ...]], all_targets: dict[str, TensorTarget],
           wanted: dict[str, TensorTarget], args: ModelArgs) -> list[str]:
    """The names in `wanted` to read; CheckpointError listing every missing, unexpected or
    mis-shaped tensor."""
    problems: list[str] = []
    # A tied checkpoint may still carry its (identical) LM head; it is not needed.
    ignorable = {"lm_head.weight", "output.weight"} if args.tie_word_embeddings else set()
    unexpected = sorted(set(shapes) - set(all_targets) - ignorable)
    missing = sorted(set(wanted) - set(shapes))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_preview(unexpected)}")
    readable = []
    for name, tgt in wanted.items():
        if name not in shapes:
            continue
        if tuple(shapes[name]) != tgt.shape:
            problems.append(f"{name}: shape {list(shapes[name])}, expected {list(tgt.shape)}")
        else:
            readable.append(name)
    if problems:
        raise CheckpointError(f"checkpoint {source.describe()} does not match {args.architecture}: " + "; ".join(problems))
    return readable


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
