"""The whole topology serving from s3:// (moto on loopback): the same tokens as the local
folder, and each actor fetched only its own tensors' bytes."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from mixserve.model.weights_source import LocalFolder
from mixserve.platform.app import APP_NAME
from tests.platform.test_s3_weights import uploaded  # noqa: F401 - the uploaded checkpoint fixture
from tests.platform.test_serve_http import MAX_TOKENS, PROMPTS, complete, deploy, expected_texts, serve_http  # noqa: F401


def tensor_sizes(folder) -> dict[str, int]:
    sizes = {}
    for path in LocalFolder(folder).files():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                shape = t.get_shape()
                n = 1
                for d in shape:
                    n *= d
                sizes[name] = n * 4  # float32 checkpoints
    return sizes


@pytest.mark.slow
def test_serving_from_s3_matches_the_local_folder_and_each_actor_fetches_its_own_bytes(
    serve_http, uploaded, mixtral_dir, tmp_path  # noqa: F811
):
    from ray import serve

    engine = {"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 64, "num_threads": 1}
    deploy(
        serve_http, uploaded,
        model={"name": "tiny", "source": uploaded, "cache_dir": str(tmp_path / "cache")},
        attention={"engine": engine}, experts={"shards": 2},
    )
    for prompt, max_tokens, text in zip(PROMPTS, MAX_TOKENS, expected_texts(mixtral_dir)):
        response = complete(serve_http, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == text

    sizes = tensor_sizes(mixtral_dir)
    replica_report = serve.get_deployment_handle("AttentionReplica", APP_NAME).weights_report.remote().result()
    non_expert = sum(n for name, n in sizes.items() if ".experts." not in name)
    assert replica_report["tensor_bytes"] == non_expert
    shard_reports = serve.get_deployment_handle("ExpertRouter", APP_NAME).weights_reports.remote().result()
    assert sorted(shard_reports) == [0, 1]
    for sid, experts in ((0, range(0, 4)), (1, range(4, 8))):
        own = sum(n for name, n in sizes.items() if any(f".experts.{e}." in name for e in experts))
        assert shard_reports[sid]["tensor_bytes"] == own, sid
