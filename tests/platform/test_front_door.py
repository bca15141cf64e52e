"""The HTTP front door for many tenants, through Ray Serve's real HTTP proxy on loopback:
the official openai client unchanged, keys, quotas across 2 ingress replicas, error
statuses, usage metering, metrics, and a client leaving mid-stream."""

from __future__ import annotations

import re
import time

import openai
import pytest
import requests

from mixserve import LLM, SamplingParams
from mixserve.platform.tenants import GUARDRAIL_PROMPT, hash_key, new_key
from tests.platform.test_serve_http import deploy, serve_http  # noqa: F401 - the shared Serve fixture
from tests.waiting import wait_until

KEYS = {name: new_key() for name in ("alpha", "beta", "limited", "other", "admin", "flood", "calm", "single", "frugal", "chatty")}
ENGINE = {"max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 64, "num_threads": 1}


def tenant(name: str, **limits) -> dict:
    return {"name": name, "key_sha256": [hash_key(KEYS[name])], **limits}


TENANTS = [
    tenant("alpha", weight=2.0),
    tenant("beta", system_prompt="guardrail"),
    tenant("limited", requests_per_min=3, tokens_per_min=400),
    tenant("other", models=["some-other-model"]),
    tenant("admin", admin=True),
    tenant("flood"),
    tenant("calm"),
    tenant("single", max_concurrent=1),
    tenant("frugal", tokens_per_min=60),
    tenant("chatty", tokens_per_min=270),  # less than a context (256) and a prompt
]


@pytest.fixture(scope="module")
def door(serve_http, mixtral_dir):  # noqa: F811
    deploy(serve_http, mixtral_dir, attention={"engine": ENGINE}, http={"ingress_replicas": 2}, tenants=TENANTS)
    return serve_http


def client(url: str, who: str = "alpha") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[who], max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def test_the_openai_client_works_unchanged(door, mixtral_dir):
    api = client(door)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    prompt = [1, 415, 2936, 9060]
    expected = LLM(mixtral_dir, max_model_len=256).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True))[0]

    done = api.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert done.usage.prompt_tokens == 4 and done.usage.completion_tokens == 8
    assert len(choice.logprobs.tokens) == 8
    chosen = [lp[t] for lp, t in zip(expected.logprobs, expected.token_ids)]
    assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, chosen)) < 1e-4
    assert all(2 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)

    chunks = list(api.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 8

    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: both choices agree
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens // 2
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)

    stream = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.total_tokens == parts[-1].usage.prompt_tokens + parts[-1].usage.completion_tokens


def test_a_tenant_system_prompt_is_used_when_the_request_brings_none(door):
    beta = client(door, "beta").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    explicit = client(door).chat.completions.create(
        model="tiny", max_tokens=1, messages=[{"role": "system", "content": GUARDRAIL_PROMPT}, {"role": "user", "content": "Hi"}])
    plain = client(door).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert beta.usage.prompt_tokens == explicit.usage.prompt_tokens > plain.usage.prompt_tokens


def error_of(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_each_refusal_has_its_status_and_an_openai_error_body(door):
    url = f"{door}/v1/completions"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert error_of(requests.post(url, json=body, timeout=30), 401)["type"] == "authentication_error"
    wrong = {"Authorization": "Bearer msk-not-a-key"}
    assert error_of(requests.post(url, json=body, headers=wrong, timeout=30), 401)
    other = {"Authorization": f"Bearer {KEYS['other']}"}
    assert error_of(requests.post(url, json=body, headers=other, timeout=30), 403)["param"] == "model"
    alpha = {"Authorization": f"Bearer {KEYS['alpha']}"}
    assert error_of(requests.post(url, json={**body, "model": "nope"}, headers=alpha, timeout=30), 404)["param"] == "model"
    too_long = {**body, "prompt": list(range(1, 200)), "max_tokens": 100}
    assert error_of(requests.post(url, json=too_long, headers=alpha, timeout=30), 400)["code"] == "context_length_exceeded"
    assert error_of(requests.post(url, json={**body, "n": 99}, headers=alpha, timeout=30), 400)["param"] == "n"
    huge = {**body, "prompt": "x" * (2 << 20)}
    assert error_of(requests.post(url, json=huge, headers=alpha, timeout=30), 413)
    as_json = {**alpha, "content-type": "application/json"}
    # Sent chunked (no Content-Length): refused as 413 all the same, and a small one served.
    chunked_huge = iter([b'{"model": "tiny", "prompt": "', b"x" * (2 << 20), b'", "max_tokens": 2}'])
    assert error_of(requests.post(url, data=chunked_huge, headers=as_json, timeout=30), 413)["code"] == "request_too_large"
    chunked_small = iter([b'{"model": "tiny", "prompt": [1, 2], ', b'"max_tokens": 2}'])
    assert requests.post(url, data=chunked_small, headers=as_json, timeout=60).status_code == 200
    # A lone surrogate is valid JSON, not valid Unicode: the tokenizer never sees it.
    lone = '{"model": "tiny", "prompt": "hi \\ud800", "max_tokens": 2}'
    assert error_of(requests.post(url, data=lone, headers=as_json, timeout=30), 400)["param"] == "prompt"
    lone_chat = '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'
    assert error_of(requests.post(f"{door}/v1/chat/completions", data=lone_chat, headers=as_json, timeout=30),
                    400)["param"] == "messages"
    top_seed = requests.post(url, json={**body, "prompt": [1, 2], "seed": 2**63 - 1, "n": 2}, headers=alpha, timeout=60)
    assert top_seed.status_code == 200 and len(top_seed.json()["choices"]) == 2, top_seed.text
    chat = {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}
    assert error_of(requests.post(f"{door}/v1/chat/completions", json=chat, headers=alpha, timeout=30), 400)
    assert error_of(requests.get(f"{door}/v1/usage", headers=alpha, timeout=30), 403)
    assert requests.get(f"{door}/health", timeout=30).status_code == 200  # no key needed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{door}/v1", api_key="wrong", max_retries=0).models.list()


def test_quotas_hold_across_two_ingress_replicas_and_usage_is_metered(door):
    limited = {"Authorization": f"Bearer {KEYS['limited']}"}
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}
    statuses = [requests.post(f"{door}/v1/completions", json=body, headers=limited, timeout=60) for _ in range(5)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]  # 3 per minute, whichever ingress
    refused = statuses[3]
    assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["Retry-After"]) >= 1
    usage = requests.get(f"{door}/v1/usage", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30).json()
    assert usage["tenants"]["limited"]["requests"] == 3 and usage["tenants"]["limited"]["rejected"] == 2
    assert usage["tenants"]["limited"]["completion_tokens"] == 6
    with pytest.raises(openai.RateLimitError):
        client(door, "limited").completions.create(model="tiny", prompt=[1, 2], max_tokens=1)


def test_concurrency_and_tokens_per_minute_hold_across_the_ingress_replicas(door):
    single = {"Authorization": f"Bearer {KEYS['single']}"}
    long = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 150, "ignore_eos": True, "stream": True}
    with requests.post(f"{door}/v1/completions", json=long, headers=single, stream=True, timeout=60) as first:
        lines = first.iter_lines()  # kept: dropping the iterator closes the connection (a disconnect)
        next(lines)  # in flight now
        second = [requests.post(f"{door}/v1/completions", json={**long, "stream": False}, headers=single, timeout=60)
                  for _ in range(4)]  # whichever ingress replica each lands on
        assert all(r.status_code == 429 and "in flight" in r.json()["error"]["message"] for r in second), [r.text for r in second]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the first one settled: the tenant may send again
        again = requests.post(f"{door}/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 1},
                              headers=single, timeout=60)
        if again.status_code == 200:
            break
        time.sleep(0.2)
    assert again.status_code == 200

    frugal = {"Authorization": f"Bearer {KEYS['frugal']}"}
    body = {"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 20}
    statuses = [requests.post(f"{door}/v1/completions", json=body, headers=frugal, timeout=60).status_code for _ in range(4)]
    assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]  # 2 x (4 + 20) fit in 60 tokens/min, a 3rd not
    too_big = requests.post(f"{door}/v1/completions", json={**body, "max_tokens": 100}, headers=frugal, timeout=60)
    assert too_big.status_code == 429 and "lower max_tokens" in too_big.json()["error"]["message"]


def test_a_chat_turn_without_max_tokens_may_run_to_the_end_of_the_context(door):
    # OpenAI's chat API (and the official clients, which leave it unset) mean "up to the context's
    # end"; completions keep OpenAI's default of 16.
    api = client(door)
    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0,
                                       extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == ENGINE["max_model_len"]
    newer = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0,
                                        max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert newer.usage.completion_tokens == 3
    plain = api.completions.create(model="tiny", prompt=[1, 2, 3], temperature=0, extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens == 16

    # A tenant whose tokens/min is below a context still gets such turns: each reserves 16 tokens
    # a choice at admission and is charged what it made when it ends.
    chatty = client(door, "chatty")
    long = chatty.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0,
                                          extra_body={"ignore_eos": True})
    assert long.usage.total_tokens == ENGINE["max_model_len"]
    with pytest.raises(openai.RateLimitError, match="over its 270 tokens per minute"):  # 256 used + 16 and a prompt
        chatty.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}])


def test_a_client_leaving_mid_stream_frees_its_slot_within_a_second(door):
    alpha = {"Authorization": f"Bearer {KEYS['alpha']}"}
    deadline = time.monotonic() + 10
    while metric(door, "mixserve_cache_slots_free") != ENGINE["max_num_seqs"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(door, "mixserve_cache_slots_free") == ENGINE["max_num_seqs"]
    # As long as the context allows: the stream must still run when the client leaves (tiny decodes
    # ~250 tokens/s here, and the server's writes fill the socket buffers whether the client reads).
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True, "stream": True}
    with requests.post(f"{door}/v1/completions", json=body, headers=alpha, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        # let the replica report the running request (its stats go out twice a second), then leave at once
        running = ENGINE["max_num_seqs"] - 1
        wait_until(lambda: metric(door, "mixserve_cache_slots_free") == running, timeout_s=3, every_s=0.05)
        assert metric(door, "mixserve_cache_slots_free") == ENGINE["max_num_seqs"] - 1
    left = time.monotonic()
    while metric(door, "mixserve_cache_slots_free") != ENGINE["max_num_seqs"] and time.monotonic() - left < 5:
        time.sleep(0.05)
    assert time.monotonic() - left < 1.0 + 0.5  # freed within 1 s; the metric itself is refreshed every 0.5 s
    # Settlements reach the ledger in batches (every 0.25 s, mixserve/platform/metering.py), so the
    # slot can show free a moment before the request's outcome is counted.
    closed = 'mixserve_requests_total{endpoint="completions",model="tiny",status="client_closed",tenant="alpha"}'
    assert wait_until(lambda: closed in requests.get(
        f"{door}/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30).text, timeout_s=2.0)


def first_token_s(url: str, who: str, max_tokens: int) -> float:
    body = {"model": "tiny", "prompt": [1, 5, 6, 7], "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    with requests.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[who]}"},
                       stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if line:
                elapsed = time.monotonic() - start
                for _ in response.iter_lines():  # read the rest so the request ends normally
                    pass
                return elapsed
    raise AssertionError("no chunk")


FLOOD_CLIENT = """
import os, sys, threading, requests
os.nice(19)  # the load generator shares this machine's 2 cores with the server: keep it out of the way
url, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = {"model": "tiny", "prompt": [1, 5, 6, 7], "max_tokens": 64, "ignore_eos": True}
def flood():
    while True:
        requests.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer " + key}, timeout=120)
for _ in range(n):
    threading.Thread(target=flood, daemon=True).start()
sys.stdin.read()  # runs until the test closes stdin
"""


def test_fair_share_a_flooding_tenant_barely_moves_another_tenants_time_to_first_token(door):
    import statistics
    import subprocess
    import sys

    for _ in range(2):
        first_token_s(door, "calm", 4)  # warm-up
    unloaded = statistics.median(first_token_s(door, "calm", 4) for _ in range(15))
    # 10 concurrent requests from the flooding tenant against 1 from the calm one (10x its load),
    # with 4 cache slots: flood's requests queue, and without fair sharing calm's would queue behind them.
    flood = subprocess.Popen([sys.executable, "-c", FLOOD_CLIENT, door, KEYS["flood"], "10"], stdin=subprocess.PIPE)
    try:
        time.sleep(1.5)
        loaded = statistics.median(first_token_s(door, "calm", 4) for _ in range(15))
        flooded = requests.get(f"{door}/v1/usage", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30).json()
    finally:
        flood.kill()
        flood.wait()
    print(f"calm tenant's median time to first token: unloaded {unloaded * 1e3:.0f} ms, under flood {loaded * 1e3:.0f} ms")
    assert flooded["tenants"]["flood"]["requests"] >= 10  # the flood was real
    assert loaded <= 2 * unloaded
