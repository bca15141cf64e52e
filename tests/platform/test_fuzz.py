"""Fuzzing both front doors on a live deployment: schemathesis from the OpenAPI schema, and
hypothesis on raw JSON bodies and gRPC messages. Whatever comes in: no 5xx (no INTERNAL or
UNKNOWN over gRPC), no hang, and the server keeps serving."""

from __future__ import annotations

import json

import grpc
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixserve.platform.tenants import hash_key, new_key
from tests.platform.test_grpc import ReflectedClient
from tests.platform.test_serve_http import free_port

KEY = new_key()
HEADERS = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SAMPLING_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "logprobs",
                   "ignore_eos", "stream_options", "echo", "top_logprobs", "max_completion_tokens", "user"]


@pytest.fixture(scope="module")
def fuzz_door(ray_cluster, mixtral_dir):
    from ray import serve

    from mixserve.platform.app import APP_NAME, build_app
    from mixserve.platform.config import DeploymentConfig

    serve.shutdown()
    config = DeploymentConfig.model_validate({
        "model": {"name": "tiny", "source": str(mixtral_dir)},
        "attention": {"engine": {"max_model_len": 64, "max_num_seqs": 4, "num_threads": 1}},
        "http": {"port": free_port()}, "grpc": {"port": free_port()},
        "tenants": [{"name": "fuzzer", "key_sha256": [hash_key(KEY)], "admin": True}],
    })
    serve.start(**config.serve_start_options())
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{config.http.port}", f"127.0.0.1:{config.grpc.port}"
    serve.shutdown()


def still_serving(url: str) -> None:
    ok = requests.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 1},
                       headers=HEADERS, timeout=60)
    assert ok.status_code == 200, ok.text


def test_schemathesis_finds_no_server_error_in_any_operation(fuzz_door):
    # The schema is the server's own /openapi.json; each operation's cases come from its
    # hypothesis strategy. (Schemathesis' pytest plugin is not used: it does not run on pytest 9.)
    schema = schemathesis.openapi.from_url(f"{fuzz_door[0]}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def no_server_error(case):
            response = case.call(headers=HEADERS, timeout=60)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert response.json()["error"]["message"]

        no_server_error()
    still_serving(fuzz_door[0])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries({"model": st.just("tiny"), "prompt": JSON | st.lists(st.integers(-5, 40000), max_size=8)},
                          optional={f: JSON for f in SAMPLING_FIELDS}),
    st.fixed_dictionaries({"model": st.just("tiny"), "messages": JSON | st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | JSON, "content": JSON}),
        max_size=3)}, optional={f: JSON for f in SAMPLING_FIELDS}),
)


@FUZZ
@given(body=BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_json_bodies_get_4xx_or_a_result(fuzz_door, body, path):
    # json.dumps writes NaN and Infinity as bare words: not JSON, which the server must refuse with a 400
    raw = json.dumps(body)
    response = requests.post(f"{fuzz_door[0]}{path}", data=raw, headers={**HEADERS, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code < 500, (raw, response.text[:500])


def test_the_server_still_serves_after_the_http_fuzzing(fuzz_door):
    still_serving(fuzz_door[0])


@pytest.fixture(scope="module")
def grpc_client(fuzz_door):
    client = ReflectedClient(fuzz_door[1])
    yield client
    client.channel.close()  # an open channel at interpreter exit can crash grpc's threads


SAMPLING = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(0, 2**32 - 1), "temperature": st.floats(width=32, allow_nan=True),
    "top_p": st.floats(width=32, allow_nan=True), "top_k": st.integers(-(2**31), 2**31 - 1),
    "seed": st.integers(0, 2**64 - 1), "stop": st.lists(st.text(max_size=300), max_size=20),
    "ignore_eos": st.booleans(), "logprobs": st.integers(0, 2**32 - 1), "n": st.integers(0, 2**32 - 1),
})
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}


@FUZZ
@given(
    model=st.sampled_from(["tiny", "", "other"]), text=st.none() | st.text(max_size=100),
    ids=st.none() | st.lists(st.integers(0, 2**32 - 1), max_size=80), sampling=SAMPLING,
    roles=st.lists(st.sampled_from(["user", "assistant", "system", "", "x"]), max_size=3),
    method=st.sampled_from(["Generate", "GenerateStream", "Chat", "ChatStream"]),
)
def test_random_grpc_messages_get_a_proper_status(grpc_client, model, text, ids, sampling, roles, method):
    options = grpc_client.message("SamplingOptions", **sampling)
    if method.startswith("Chat"):
        messages = [grpc_client.message("ChatMessage", role=r, content=text or "") for r in roles]
        request = grpc_client.message("ChatRequest", model=model, messages=messages, sampling=options)
    elif ids is not None:
        request = grpc_client.message("GenerateRequest", model=model, token_ids=grpc_client.message("TokenIds", ids=ids), sampling=options)
    else:
        request = grpc_client.message("GenerateRequest", model=model, text=text or "", sampling=options)
    try:
        result = grpc_client.call(method, request, key=KEY)
        if not hasattr(result, "SerializeToString"):
            list(result)
    except grpc.RpcError as err:
        assert err.code() not in BAD_CODES, (method, request, err.details())


def test_malformed_grpc_bytes_do_not_hang_or_break_the_server(grpc_client, fuzz_door):
    stub = grpc_client.channel.unary_unary("/mixserve.v1.Mixserve/Generate", request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
    for garbage in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
        with pytest.raises(grpc.RpcError) as info:
            stub(garbage, metadata=[("authorization", f"Bearer {KEY}")], timeout=30)
        assert info.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED
    still_serving(fuzz_door[0])
