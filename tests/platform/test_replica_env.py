"""What attention replicas are started with (their Ray actor options)."""

from __future__ import annotations

from mixserve.platform.app import replica_actor_options
from mixserve.platform.config import DeploymentConfig


def config(checkpoint, **sections) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"model": {"name": "tiny", "source": str(checkpoint)}, **sections})


def test_replicas_with_remote_experts_get_short_openmp_spins_and_in_process_ones_keep_the_default(monkeypatch, mixtral_dir):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    remote = replica_actor_options(config(mixtral_dir, attention={"cpus_per_replica": 0.5}, experts={"shards": 2}))
    assert remote == {"num_cpus": 0.5, "num_gpus": 0.0, "runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "10000"}}}
    assert "runtime_env" not in replica_actor_options(config(mixtral_dir, experts={"shards": 0}))


def test_a_spin_count_set_by_the_operator_wins(monkeypatch, mixtral_dir):
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")
    options = replica_actor_options(config(mixtral_dir, experts={"shards": 4}))
    assert options["runtime_env"] == {"env_vars": {"GOMP_SPINCOUNT": "500"}}
