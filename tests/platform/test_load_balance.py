"""Replicating a hot expert through the running topology lowers the shards' max/mean load."""

from __future__ import annotations

import time

import pytest
import requests

from mixserve.platform.app import APP_NAME, build_app
from mixserve.platform.config import DeploymentConfig
from mixserve.platform.demo_checkpoint import favour_expert, random_hf_tensors, write_checkpoint
from tests.conftest import SMALL_MIXTRAL
from tests.platform.test_serve_http import serve_http  # noqa: F401 - the shared Serve fixture

HOT = 3


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory):
    """Every layer's gate is near zero except expert 3's row: about half the tokens pick expert 3
    first, so the shard holding it carries far more than the mean."""
    tensors = favour_expert(random_hf_tensors(SMALL_MIXTRAL, seed=21), SMALL_MIXTRAL, HOT)
    return write_checkpoint(tmp_path_factory.mktemp("skewed"), SMALL_MIXTRAL, tensors=tensors)


def shard_loads(router) -> list[float]:
    time.sleep(2.5)  # replicas report their dispatched tokens every second
    return list(router.status.remote().result().shard_tokens)


def balance(loads: list[float]) -> float:
    return max(loads) / (sum(loads) / len(loads))


def test_replicating_the_hot_expert_lowers_max_over_mean_and_keeps_tokens(serve_http, skewed_dir):  # noqa: F811
    from ray import serve

    config = DeploymentConfig.model_validate({
        "model": {"name": "tiny", "source": str(skewed_dir)},
        "attention": {"engine": {"max_model_len": 256, "num_threads": 1}},
        "experts": {"shards": 4, "experts_per_shard": 3, "replicate_hottest": 2},
    })
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    router = serve.get_deployment_handle("ExpertRouter", app_name=APP_NAME)
    prompts = [[1] + list(range(100 + 7 * i, 130 + 7 * i)) for i in range(4)]

    def run_all() -> list[str]:
        texts = []
        for prompt in prompts:
            r = requests.post(f"{serve_http}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        return texts

    texts_before = run_all()
    before = shard_loads(router)
    version = router.rebalance.remote().result()
    assert version >= 1
    status = router.status.remote().result()
    assert sum(HOT in experts for experts in status.shards.values()) >= 2
    time.sleep(2.5)  # replicas pick up the new placement between steps
    texts_after = run_all()
    after = shard_loads(router)
    delta = [a - b for a, b in zip(after, before)]
    assert texts_after == texts_before
    assert balance(delta) < balance(before) - 0.05, (before, delta)
