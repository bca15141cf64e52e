"""Model hyper-parameters, read from a Hugging Face config.json or Mistral's params.json.

The two files describe the same architecture with different names; both end up in one
frozen `ModelArgs` so that nothing below this module knows which one it came from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mixserve.errors import CheckpointError

HF_ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM")


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and constants of one Mistral-family decoder."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    num_experts: int = 0  # 0 = dense SwiGLU MLP (Mistral 7B)
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"model config: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise CheckpointError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(
                f"model config: num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"1..num_experts ({self.num_experts})"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def architecture(self) -> str:
        return "MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"

    def param_count(self, active_only: bool = False) -> int:
        """Number of weights; with active_only, those one token touches (top-k experts only)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn_one = 3 * self.dim * self.hidden_dim
        n_ffn = (self.num_experts_per_tok if active_only else self.num_experts) if self.is_moe else 1
        gate = self.dim * self.num_experts
        per_layer = attn + n_ffn * ffn_one + gate + 2 * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + head + self.dim

    # ---- Hugging Face config.json ------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        archs = config.get("architectures") or []
        model_type = config.get("model_type")
        if not any(a in HF_ARCHITECTURES for a in archs) and model_type not in ("mistral", "mixtral"):
            raise CheckpointError(
                f"config.json describes {archs or model_type!r}; mixserve serves "
                f"{' and '.join(HF_ARCHITECTURES)} only"
            )
        try:
            n_heads = int(config["num_attention_heads"])
            dim = int(config["hidden_size"])
            rope = config.get("rope_parameters") or {}
            rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
            num_experts = int(config.get("num_local_experts", 0) or 0)
            return cls(
                vocab_size=int(config["vocab_size"]),
                dim=dim,
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                head_dim=int(config.get("head_dim") or dim // n_heads),
                hidden_dim=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                sliding_window=_optional_int(config.get("sliding_window")),
                max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
                num_experts=num_experts,
                num_experts_per_tok=int(config.get("num_experts_per_tok", 2)) if num_experts else 2,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                bos_token_id=int(config.get("bos_token_id", 1) or 1),
                eos_token_id=_first_int(config.get("eos_token_id", 2)),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json has a malformed field: {exc}") from None

    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The config.json that Hugging Face writes for this architecture (hub layout)."""
        config: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "mixtral" if self.is_moe else "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "torch_dtype": torch_dtype,
        }
        if self.is_moe:
            config.update(
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                router_aux_loss_coef=0.02,
                output_router_logits=False,
            )
        return config

    # ---- Mistral params.json -----------------------------------------------------------
    @classmethod
    def from_params_json(cls, params: dict[str, Any]) -> ModelArgs:
        try:
            moe = params.get("moe") or {}
            n_heads = int(params["n_heads"])
            dim = int(params["dim"])
            return cls(
                vocab_size=int(params["vocab_size"]),
                dim=dim,
                n_layers=int(params["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(params.get("n_kv_heads") or n_heads),
                head_dim=int(params.get("head_dim") or dim // n_heads),
                hidden_dim=int(params["hidden_dim"]),
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                sliding_window=_optional_int(params.get("sliding_window")),
                max_position_embeddings=int(params.get("max_seq_len", params.get("max_position_embeddings", 32768))),
                num_experts=int(moe.get("num_experts", 0)),
                num_experts_per_tok=int(moe.get("num_experts_per_tok", 2)),
            )
        except KeyError as exc:
            raise CheckpointError(f"params.json lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"params.json has a malformed field: {exc}") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArgs:
        """Reads config.json (Hugging Face) or else params.json (Mistral) from a checkpoint folder."""
        folder = Path(folder)
        for name, parse in (("config.json", cls.from_hf_config), ("params.json", cls.from_params_json)):
            path = folder / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
                if not isinstance(data, dict):
                    raise CheckpointError(f"{path} must hold a JSON object")
                return parse(data)
        raise CheckpointError(f"{folder} has neither config.json (Hugging Face) nor params.json (Mistral)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _first_int(value: Any) -> int:
    """eos_token_id may be a list in newer configs; the first one is the model's EOS."""
    if isinstance(value, list):
        return int(value[0])
    return int(value)
