"""ModelArgs from config.json and params.json; the papers' shapes as config-only presets."""

from __future__ import annotations

import json

import pytest

from mixserve.errors import CheckpointError
from mixserve.model.args import ModelArgs
from mixserve.model.presets import PRESETS, preset


def test_mixtral_8x7b_has_the_papers_parameter_counts():
    args = PRESETS["mixtral-8x7b"]
    assert args.param_count() == pytest.approx(46.7e9, rel=0.01)  # "47B parameters"
    assert args.param_count(active_only=True) == pytest.approx(12.9e9, rel=0.01)  # "13B active"


def test_mistral_7b_shapes():
    args = PRESETS["mistral-7b"]
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.sliding_window) == (4096, 32, 32, 8, 4096)
    assert args.param_count() == pytest.approx(7.24e9, rel=0.01)


def test_hf_config_round_trip_keeps_head_dim_window_and_rope_theta():
    args = preset("tiny-mixtral", head_dim=24, sliding_window=48, rope_theta=12345.0)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_transformers_5_rope_parameters_are_read():
    config = preset("tiny-mistral").to_hf_config()
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 777.0}
    assert ModelArgs.from_hf_config(config).rope_theta == 777.0


def test_params_json_of_mixtral(tmp_path):
    params = {
        "dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
        "norm_eps": 1e-5, "vocab_size": 32000, "rope_theta": 1e6, "moe": {"num_experts": 8, "num_experts_per_tok": 2},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = ModelArgs.from_folder(tmp_path)
    assert args == PRESETS["mixtral-8x7b"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "serves"),
        ({"num_key_value_heads": 3}, "must divide"),
        ({"hidden_size": "x"}, "malformed"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(change, message):
    config = {**preset("tiny-mixtral").to_hf_config(), **change}
    with pytest.raises(CheckpointError, match=message):
        ModelArgs.from_hf_config(config)


def test_missing_config_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither config.json"):
        ModelArgs.from_folder(tmp_path)
