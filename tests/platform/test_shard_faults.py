"""A shard killed mid-generation: the request ends with a clear retryable error quickly, the
router restores the shard, new requests succeed, and nothing leaks."""

from __future__ import annotations

import json
import threading
import time

import requests

from mixserve.platform.app import APP_NAME, build_app
from mixserve.platform.config import DeploymentConfig
from tests.platform.test_serve_http import serve_http  # noqa: F401 - the shared Serve fixture


def test_killed_shard_fails_in_flight_requests_then_recovers(serve_http, mixtral_dir):  # noqa: F811
    import ray
    from ray import serve

    config = DeploymentConfig.model_validate({
        "model": {"name": "tiny", "source": str(mixtral_dir)},
        "attention": {"engine": {"max_model_len": 2048, "max_num_seqs": 4, "num_threads": 1}},
        "experts": {"shards": 2, "dispatch_timeout_s": 10},
    })
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    router = serve.get_deployment_handle("ExpertRouter", app_name=APP_NAME)
    replica = serve.get_deployment_handle("AttentionReplica", app_name=APP_NAME)
    victim = router.shard_handles.remote().result()[1]

    events: list[str] = []
    started = threading.Event()

    def stream_long_request():
        with requests.post(f"{serve_http}/v1/completions", stream=True, timeout=120, json={
                "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1500, "ignore_eos": True,
                "temperature": 0, "stream": True}) as response:
            for line in response.iter_lines(decode_unicode=True):
                if line:
                    events.append(line)
                    started.set()

    client = threading.Thread(target=stream_long_request)
    client.start()
    assert started.wait(60)
    ray.kill(victim, no_restart=True)
    killed_at = time.monotonic()
    client.join(timeout=60)
    assert not client.is_alive()
    ended_after = time.monotonic() - killed_at
    assert ended_after < 15, ended_after
    errors = [json.loads(e[len("data: "):])["error"] for e in events if '"error"' in e]
    assert errors and "retried" in errors[0]["message"], events[-3:]
    assert events[-1] == "data: [DONE]"

    # the router brings the shard back; the replica picks up the new handles
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if all(router.status.remote().result().alive.values()):
            break
        time.sleep(1)
    assert all(router.status.remote().result().alive.values())
    time.sleep(2.5)
    response = requests.post(f"{serve_http}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    stats = replica.stats.remote().result()
    assert stats["free_slots"] == stats["slots"] and stats["running"] == 0
