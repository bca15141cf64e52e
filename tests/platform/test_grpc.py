"""The gRPC front door through Ray Serve's real gRPC proxy on loopback, called by a client that
knows the API only from server reflection (no generated code on the client side)."""

from __future__ import annotations

import re
import time

import grpc
import pytest
import requests
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from mixserve import LLM, SamplingParams
from mixserve.platform.tenants import hash_key, new_key
from tests.platform.test_serve_http import free_port
from tests.waiting import wait_until

SERVICE = "mixserve.v1.Mixserve"
KEYS = {name: new_key() for name in ("main", "once", "elsewhere", "admin")}
TENANTS = [
    {"name": "main", "key_sha256": [hash_key(KEYS["main"])]},
    {"name": "once", "key_sha256": [hash_key(KEYS["once"])], "requests_per_min": 1},
    {"name": "elsewhere", "key_sha256": [hash_key(KEYS["elsewhere"])], "models": ["another"]},
    {"name": "admin", "key_sha256": [hash_key(KEYS["admin"])], "admin": True},
]
SLOTS = 4


class ReflectedClient:
    """Message classes and stubs built from the server's reflection service alone."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        self.service = self.pool.FindServiceByName(SERVICE)

    def message(self, name: str, **fields):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(f"mixserve.v1.{name}"))(**fields)

    def call(self, method: str, request, key: str | None = "main", timeout: float = 60):
        m = self.service.FindMethodByName(method)
        response_class = message_factory.GetMessageClass(m.output_type)
        make = self.channel.unary_stream if m.server_streaming else self.channel.unary_unary
        stub = make(f"/{SERVICE}/{method}", request_serializer=lambda r: r.SerializeToString(),
                    response_deserializer=response_class.FromString)
        metadata = [("authorization", f"Bearer {KEYS.get(key, key)}")] if key else []  # a tenant's name, or a key
        return stub(request, metadata=metadata, timeout=timeout)


@pytest.fixture(scope="module")
def grpc_door(ray_cluster, mixtral_dir):
    from ray import serve

    from mixserve.platform.app import APP_NAME, build_app
    from mixserve.platform.config import DeploymentConfig

    serve.shutdown()  # gRPC options are fixed when Serve starts
    config = DeploymentConfig.model_validate({
        "model": {"name": "tiny", "source": str(mixtral_dir)},
        "attention": {"engine": {"max_model_len": 256, "max_num_seqs": SLOTS, "num_threads": 1}},
        "http": {"port": free_port()}, "grpc": {"port": free_port()}, "tenants": TENANTS,
    })
    serve.start(**config.serve_start_options())
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    client = ReflectedClient(f"127.0.0.1:{config.grpc.port}")
    yield client, f"http://127.0.0.1:{config.http.port}"
    client.channel.close()  # an open channel at interpreter exit can crash grpc's threads
    serve.shutdown()


def sampling(client, **fields):
    return client.message("SamplingOptions", **fields)


def test_reflection_describes_every_method(grpc_door):
    client, _ = grpc_door
    assert {m.name for m in client.service.methods} == {"Generate", "GenerateStream", "Chat", "ChatStream", "ListModels"}


def test_every_method_works_and_matches_the_engine(grpc_door, mixtral_dir):
    client, _ = grpc_door
    assert [m.id for m in client.call("ListModels", client.message("ListModelsRequest")).models] == ["tiny"]
    prompt = [1, 415, 2936, 9060]
    expected = LLM(mixtral_dir, max_model_len=256).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2))[0]
    request = client.message("GenerateRequest", model="tiny", token_ids=client.message("TokenIds", ids=prompt),
                             sampling=sampling(client, max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2))
    whole = client.call("Generate", request)
    assert list(whole.choices[0].token_ids) == expected.token_ids and whole.choices[0].text == expected.text
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 8
    chosen = [lp[t] for lp, t in zip(expected.logprobs, expected.token_ids)]
    assert max(abs(a.logprob - b) for a, b in zip(whole.choices[0].logprobs, chosen)) < 1e-4

    chunks = list(client.call("GenerateStream", request))
    assert "".join(c.text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].finish_reason == "length"

    chat = client.message("ChatRequest", model="tiny", messages=[client.message("ChatMessage", role="user", content="Hello")],
                          sampling=sampling(client, max_tokens=5, temperature=0.0, n=2))
    answer = client.call("Chat", chat)
    assert len(answer.choices) == 2 and answer.choices[0].text == answer.choices[1].text
    streamed = list(client.call("ChatStream", chat))
    assert "".join(c.text for c in streamed if c.index == 0) == answer.choices[0].text
    assert streamed[-1].usage.total_tokens == answer.usage.total_tokens

    # Chat without max_tokens may run to the end of the context (as over HTTP); Generate keeps 16.
    unbounded = client.message("ChatRequest", model="tiny", messages=chat.messages,
                               sampling=sampling(client, temperature=0.0, ignore_eos=True))
    answer = client.call("Chat", unbounded)
    assert answer.usage.total_tokens == 256 and answer.choices[0].finish_reason == "length"
    plain = client.message("GenerateRequest", model="tiny", token_ids=request.token_ids,
                           sampling=sampling(client, temperature=0.0, ignore_eos=True))
    assert client.call("Generate", plain).usage.completion_tokens == 16


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not hasattr(result, "SerializeToString"):  # a stream: the status comes while reading it
            list(result)
    return info.value.code()


def test_errors_map_to_grpc_codes_and_the_server_keeps_serving(grpc_door):
    client, _ = grpc_door
    ok = client.message("GenerateRequest", model="tiny", text="Hello", sampling=sampling(client, max_tokens=2))
    models = client.message("ListModelsRequest")
    assert code_of(lambda: client.call("ListModels", models, key=None)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: client.call("Generate", ok, key="elsewhere")) == grpc.StatusCode.PERMISSION_DENIED
    unknown = client.message("GenerateRequest", model="nope", text="Hello")
    assert code_of(lambda: client.call("Generate", unknown)) == grpc.StatusCode.NOT_FOUND
    bad_top_p = client.message("GenerateRequest", model="tiny", text="Hello", sampling=sampling(client, top_p=2.0))
    assert code_of(lambda: client.call("GenerateStream", bad_top_p)) == grpc.StatusCode.INVALID_ARGUMENT
    no_prompt = client.message("GenerateRequest", model="tiny")
    assert code_of(lambda: client.call("Generate", no_prompt)) == grpc.StatusCode.INVALID_ARGUMENT
    too_long = client.message("GenerateRequest", model="tiny", token_ids=client.message("TokenIds", ids=list(range(1, 250))),
                              sampling=sampling(client, max_tokens=50))
    assert code_of(lambda: client.call("Generate", too_long)) == grpc.StatusCode.INVALID_ARGUMENT
    bad_role = client.message("ChatRequest", model="tiny", messages=[client.message("ChatMessage", role="robot", content="x")])
    assert code_of(lambda: client.call("Chat", bad_role)) == grpc.StatusCode.INVALID_ARGUMENT
    huge = client.message("GenerateRequest", model="tiny", text="x" * (2 << 20))  # over http.max_body_bytes (1 MiB)
    for method in ("Generate", "GenerateStream"):
        with pytest.raises(grpc.RpcError) as refused:
            list(client.call(method, huge)) if method.endswith("Stream") else client.call(method, huge)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "larger than" in refused.value.details()
    assert client.call("Generate", ok, key="once").choices[0].finish_reason
    assert code_of(lambda: client.call("Generate", ok, key="once")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.call("Generate", ok).choices[0].finish_reason  # still serving


def free_slots(url: str) -> float:
    text = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30).text
    return float(re.search(r"^mixserve_cache_slots_free ([0-9.]+)$", text, re.M).group(1))


def test_a_cancelled_stream_frees_its_slot(grpc_door):
    client, url = grpc_door
    long = client.message("GenerateRequest", model="tiny", token_ids=client.message("TokenIds", ids=[1, 2, 3]),
                          sampling=sampling(client, max_tokens=250, ignore_eos=True))
    stream = client.call("GenerateStream", long)
    next(stream)
    # The gauge comes from replica stats reported twice a second: wait for it (bounded), not a fixed time.
    wait_until(lambda: free_slots(url) == SLOTS - 1, timeout_s=3, every_s=0.05)
    assert free_slots(url) == SLOTS - 1
    stream.cancel()
    deadline = time.monotonic() + 5
    while free_slots(url) != SLOTS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert free_slots(url) == SLOTS
