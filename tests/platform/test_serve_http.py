"""The whole topology on a real local Ray cluster, reached over real HTTP on loopback."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import requests

from mixserve import LLM, SamplingParams
from mixserve.platform.app import APP_NAME, build_app
from mixserve.platform.config import ConfigError, DeploymentConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_http(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def deploy(serve_http, checkpoint, **sections) -> DeploymentConfig:
    from ray import serve

    config = DeploymentConfig.model_validate({"model": {"name": "tiny", "source": str(checkpoint)}, **sections})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return config


def complete(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=120)


PROMPTS = [[1, 415, 2936, 9060], [1] + list(range(300, 340)), [1, 22557]]
MAX_TOKENS = [12, 20, 7]


def expected_texts(checkpoint) -> list[str]:
    llm = LLM(checkpoint, max_model_len=256)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS]
    return [o.text for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize(
    "sections",
    [
        {"experts": {"shards": 0}},
        {"attention": {"replicas": 2}, "experts": {"shards": 4, "experts_per_shard": 3}},
        {"http": {"front_door": "separate"}, "experts": {"shards": 2}},
    ],
    ids=["experts-in-process", "2-replicas-4-shards", "separate-front-door-2-shards"],
)
def test_completions_through_the_topology_match_the_single_process_engine(serve_http, mixtral_dir, sections):
    from ray import serve

    engine = {"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 64, "num_threads": 1}
    sections.setdefault("attention", {})["engine"] = engine
    config = deploy(serve_http, mixtral_dir, **sections)
    # The front door runs inside the attention replicas unless asked to run apart.
    deployments = set(serve.status().applications[APP_NAME].deployments)
    assert ("HttpIngress" in deployments) == (not config.front_door_in_replicas)
    assert config.front_door_in_replicas == (sections.get("http", {}).get("front_door") != "separate")
    stats = serve.get_deployment_handle("AttentionReplica", app_name=APP_NAME).stats.remote().result(timeout_s=30)
    assert stats["model"] == "tiny" and stats["running"] == 0
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(
            lambda pm: complete(serve_http, prompt=pm[0], max_tokens=pm[1], temperature=0, ignore_eos=True),
            zip(PROMPTS, MAX_TOKENS),
        ))
    for response, text, max_tokens, prompt in zip(responses, expected_texts(mixtral_dir), MAX_TOKENS, PROMPTS):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["text"] == text
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                                 "total_tokens": len(prompt) + max_tokens}
    if config.experts.shards:  # the router's internal calls (a heartbeat a second per replica) write no access log
        import ray

        router_logs = list((Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve").glob(
            f"replica_{APP_NAME}_ExpertRouter_*.log"))
        assert router_logs and not any("CALL heartbeat" in log.read_text() for log in router_logs)


def test_streaming_sends_deltas_then_done(serve_http, mixtral_dir):
    deploy(serve_http, mixtral_dir, attention={"engine": {"max_model_len": 256, "num_threads": 1}})
    with requests.post(f"{serve_http}/v1/completions", stream=True, timeout=120,
                       json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == expected_texts(mixtral_dir)[0]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12


BAD_REQUESTS = [
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
]


def test_bad_requests_get_openai_error_bodies_and_the_server_keeps_serving(serve_http, mixtral_dir):
    deploy(serve_http, mixtral_dir, attention={"engine": {"max_model_len": 256, "num_threads": 1}})
    for body, status, param in BAD_REQUESTS:
        response = requests.post(f"{serve_http}/v1/completions", json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["param"] == param, (body, error)
    for raw, says in (('{"model": "tiny", "prompt": "hi"', "not valid JSON"), ("[1, 2]", "body: ")):
        response = requests.post(f"{serve_http}/v1/completions", data=raw, headers={"content-type": "application/json"},
                                 timeout=60)
        assert response.status_code == 400, (raw, response.text)
        error = response.json()["error"]
        assert says in error["message"] and error["param"] is None and error["type"] == "invalid_request_error", (raw, error)
    assert complete(serve_http, prompt=[1, 2, 3], max_tokens=2).status_code == 200


def test_models_and_health(serve_http, mixtral_dir):
    deploy(serve_http, mixtral_dir, attention={"engine": {"max_model_len": 256, "num_threads": 1}})
    assert requests.get(f"{serve_http}/health", timeout=30).json() == {"status": "ok"}
    assert [m["id"] for m in requests.get(f"{serve_http}/v1/models", timeout=30).json()["data"]] == ["tiny"]


def test_config_errors_name_the_field(tmp_path, mixtral_dir, mistral_dir):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: x, source: /nope}\n")
    with pytest.raises(ConfigError, match="model.source"):
        DeploymentConfig.from_yaml(path)
    path.write_text(f"model: {{name: x, source: {mixtral_dir}}}\nexperts: {{shards: -1}}\n")
    with pytest.raises(ConfigError, match="experts.shards"):
        DeploymentConfig.from_yaml(path)
    path.write_text(f"model: {{name: x, source: {mistral_dir}}}\nexperts: {{shards: 2}}\n")
    with pytest.raises(ConfigError, match="dense"):
        build_app(DeploymentConfig.from_yaml(path))
    path.write_text("[not, a, mapping]")
    with pytest.raises(ConfigError, match="mapping"):
        DeploymentConfig.from_yaml(path)


def test_the_front_door_runs_apart_where_it_must_answer_without_replicas(mixtral_dir):
    def config(**sections) -> DeploymentConfig:
        return DeploymentConfig.model_validate({"model": {"name": "tiny", "source": str(mixtral_dir)}, **sections})

    to_zero = {"autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    assert config().front_door_in_replicas
    assert config(attention={"autoscaling": {"min_replicas": 1, "max_replicas": 3}}).front_door_in_replicas
    assert not config(attention=to_zero).front_door_in_replicas  # someone must answer 503 while none runs
    assert not config(http={"ingress_replicas": 2}).front_door_in_replicas
    assert not config(http={"front_door": "separate"}).front_door_in_replicas
    with pytest.raises(ValueError, match="scaled to zero"):
        config(attention=to_zero, http={"front_door": "replicas"})
    with pytest.raises(ValueError, match="ingress_replicas"):
        config(http={"front_door": "replicas", "ingress_replicas": 2})


def test_overload_gets_503_with_retry_after_and_the_server_recovers(serve_http, mixtral_dir):
    from concurrent.futures import ThreadPoolExecutor

    # 1 slot: the replica takes 4 requests at once (4 x max_num_seqs) and queues 1 more; the rest bounce.
    deploy(serve_http, mixtral_dir, attention={"engine": {"max_model_len": 256, "max_num_seqs": 1, "num_threads": 1},
                                               "max_queued_requests": 1})
    body = {"prompt": [1, 2, 3], "max_tokens": 40, "ignore_eos": True}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: complete(serve_http, **body), range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["type"] == "service_unavailable" and int(refused.headers["Retry-After"]) >= 1
    assert complete(serve_http, prompt=[1, 2], max_tokens=2).status_code == 200


def test_each_replica_also_serves_the_api_on_its_own_port_without_the_proxy(serve_http, mixtral_dir):
    from mixserve.platform.direct_ingress import replica_http_ports

    deploy(serve_http, mixtral_dir, attention={"replicas": 2, "engine": {"max_model_len": 256, "num_threads": 1}})
    ports = replica_http_ports(APP_NAME)
    assert len(ports) == 2 and len({p.port for p in ports}) == 2 and str(ports[0].port) not in serve_http
    expected = expected_texts(mixtral_dir)[0]
    for port in ports:
        url = port.url("127.0.0.1")
        with requests.post(f"{url}/v1/completions", stream=True, timeout=120,
                           json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                                 "ignore_eos": True, "stream": True}) as response:
            assert response.status_code == 200
            events = [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected
        bad = complete(url, prompt="hi", top_p=2)  # the same validation and error shape as through the proxy
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
    assert complete(serve_http, prompt=PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True).json()[
        "choices"][0]["text"] == expected  # the proxy's port keeps working
