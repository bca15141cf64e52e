"""Shared fixtures: small random checkpoints written once per test session."""

from __future__ import annotations

import pytest
import torch

from mixserve.model.presets import preset
from mixserve.platform.demo_checkpoint import write_checkpoint

torch.set_num_threads(2)

# Small shapes that keep the suite fast but exercise GQA, the rolling cache and top-2 routing.
SMALL_MIXTRAL = preset("tiny-mixtral", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, sliding_window=16)
SMALL_MISTRAL = preset("tiny-mistral", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, sliding_window=16)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mixtral"), SMALL_MIXTRAL, seed=11)


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mistral"), SMALL_MISTRAL, seed=12)


@pytest.fixture(scope="session")
def mixtral_llm(mixtral_dir):
    from mixserve import LLM

    return LLM(mixtral_dir, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session (never a mock)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
