"""Loading safetensors checkpoints: layouts, shards, and every way a folder can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixserve.errors import CheckpointError
from mixserve.model import RollingKVCache, SequenceChunk, build_step_metadata, load_model
from mixserve.model.args import ModelArgs
from mixserve.platform.demo_checkpoint import random_hf_tensors, write_checkpoint
from tests.conftest import SMALL_MIXTRAL, SMALL_MISTRAL

PROMPT = torch.tensor([1, 415, 2936, 9060, 285, 1142, 28705, 17])


def logits_of(folder) -> torch.Tensor:
    model = load_model(folder, max_positions=64)
    args = model.args
    cache = RollingKVCache(args, 1, 16, torch.float32)
    meta = build_step_metadata([SequenceChunk(0, 0, len(PROMPT))], 16)
    with torch.no_grad():
        return model(PROMPT, meta, cache, torch.arange(len(PROMPT)))


def hf_to_consolidated(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What Mistral's own checkpoints hold: other names, and wq/wk in the interleaved RoPE layout
    (the inverse of the permutation Hugging Face's conversion script applies)."""

    def to_interleaved(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, 2, args.head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)

    out = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        out[f"{dst}.attention_norm.weight"] = hf[f"{src}.input_layernorm.weight"]
        out[f"{dst}.ffn_norm.weight"] = hf[f"{src}.post_attention_layernorm.weight"]
        out[f"{dst}.attention.wq.weight"] = to_interleaved(hf[f"{src}.self_attn.q_proj.weight"], args.n_heads)
        out[f"{dst}.attention.wk.weight"] = to_interleaved(hf[f"{src}.self_attn.k_proj.weight"], args.n_kv_heads)
        out[f"{dst}.attention.wv.weight"] = hf[f"{src}.self_attn.v_proj.weight"]
        out[f"{dst}.attention.wo.weight"] = hf[f"{src}.self_attn.o_proj.weight"]
        if args.is_moe:
            out[f"{dst}.feed_forward.gate.weight"] = hf[f"{src}.block_sparse_moe.gate.weight"]
            for e in range(args.num_experts):
                for w in ("w1", "w2", "w3"):
                    out[f"{dst}.feed_forward.experts.{e}.{w}.weight"] = hf[f"{src}.block_sparse_moe.experts.{e}.{w}.weight"]
        else:
            for w, name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                out[f"{dst}.feed_forward.{w}.weight"] = hf[f"{src}.mlp.{name}.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def reference_logits(mixtral_dir):
    return logits_of(mixtral_dir)


def test_sharded_checkpoint_with_index_loads_the_same_weights(tmp_path, mixtral_dir, reference_logits):
    write_checkpoint(tmp_path, SMALL_MIXTRAL, seed=11, shard_bytes=2 * 1024**2)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert torch.equal(logits_of(tmp_path), reference_logits)


@pytest.mark.parametrize("args", [SMALL_MIXTRAL, SMALL_MISTRAL], ids=["mixtral", "mistral"])
def test_consolidated_layout_with_params_json_gives_the_same_logits(tmp_path, args):
    hf_dir, cons_dir = tmp_path / "hf", tmp_path / "consolidated"
    tensors = random_hf_tensors(args, seed=3)
    write_checkpoint(hf_dir, args, tensors=tensors)
    cons_dir.mkdir()
    save_file(hf_to_consolidated(args, tensors), str(cons_dir / "consolidated.safetensors"))
    params = {
        "dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.hidden_dim,
        "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "sliding_window": args.sliding_window,
        "max_seq_len": args.max_position_embeddings,
    }
    if args.is_moe:
        params["moe"] = {"num_experts": args.num_experts, "num_experts_per_tok": args.num_experts_per_tok}
    (cons_dir / "params.json").write_text(json.dumps(params))
    assert torch.allclose(logits_of(cons_dir), logits_of(hf_dir), atol=1e-5)


def test_what_transformers_itself_saves_loads_too(tmp_path, mixtral_dir, reference_logits):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert torch.allclose(logits_of(tmp_path), reference_logits, atol=1e-6)


def test_pickle_only_checkpoint_is_refused(tmp_path, mixtral_dir):
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(tmp_path)


def test_truncated_safetensors_is_refused(tmp_path, mixtral_dir):
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    data = (mixtral_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path)


def test_unknown_layout_is_refused(tmp_path, mixtral_dir):
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    save_file({"transformer.h.0.attn.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_model(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_reported_together(tmp_path, mixtral_dir):
    tensors = load_file(str(mixtral_dir / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.0.extra.weight"] = torch.zeros(1)
    write_checkpoint(tmp_path, SMALL_MIXTRAL, tensors=tensors)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    for needle in ("experts.3.w2.weight", "model.norm.weight", "model.layers.0.extra.weight", "q_proj.weight: shape [3, 3]"):
        assert needle in message


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist|neither config.json"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(SMALL_MIXTRAL.to_hf_config()))
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("keep_lm_head", [False, True])
def test_tied_embeddings_match_transformers_with_or_without_a_stored_lm_head(tmp_path, keep_lm_head):
    transformers = pytest.importorskip("transformers")
    args = SMALL_MISTRAL.__class__(**{**SMALL_MISTRAL.to_dict(), "tie_word_embeddings": True})
    tensors = random_hf_tensors(args, seed=4)
    if keep_lm_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path, args, tensors=tensors)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(PROMPT[None]).logits[0]
    assert torch.allclose(logits_of(tmp_path), expected, atol=1e-4)
