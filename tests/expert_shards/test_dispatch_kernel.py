"""The compiled pack and add give the numpy and torch path's results bit for bit, refuse what
they cannot index, and a machine that cannot build them dispatches all the same."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import pytest
import torch

from mixserve.errors import MixserveError
from mixserve.expert_shards import dispatch_kernel as kernel_module
from mixserve.expert_shards.channel import ShardServer, TcpTransport
from mixserve.expert_shards.dispatch import (InProcessTransport, PackedRequest, RemoteExperts, ShardClient, ShardReply,
                                             ShardUnavailableError)
from mixserve.expert_shards.dispatch_kernel import dispatch_kernel
from mixserve.expert_shards.placement import Placement


@pytest.fixture(scope="module")
def kernel():
    built = dispatch_kernel()
    if built is None:
        pytest.skip("the dispatch kernel cannot be built here (no C++ compiler or ninja)")
    return built


def gated(tokens: int, experts: int, k: int, dtype: torch.dtype, seed: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, dim], distinct expert ids [T, k] and gate weights [T, k] as a gate gives them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), dim=-1).to(dtype)
    return x, ids, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("placement, k", [
    (Placement.contiguous(8, 2, capacity=4), 2),  # many tokens have both slots on one shard
    (Placement.contiguous(8, 8, capacity=1), 2),
    (Placement.contiguous(8, 4, capacity=3).with_replica(0, 2), 2),  # a hot expert split over 2 shards
    (Placement.contiguous(6, 3), 3),
    (Placement.contiguous(8, 2, capacity=4), 1),
], ids=["2-shards", "8-shards", "4-shards-replicated", "3-slots", "1-slot"])
def test_the_compiled_pack_gives_the_library_path_requests_bit_for_bit(kernel, placement, k, dtype):
    compiled = ShardClient(placement, InProcessTransport([]), compiled=True)
    library = ShardClient(placement, InProcessTransport([]), compiled=False)
    assert compiled.kernel is kernel and library.kernel is None
    for seed, tokens in enumerate((1, 7, 32, 33)):
        x, ids, weights = gated(tokens, placement.num_experts, k, dtype, seed)
        got = compiled.pack(placement, x, ids, weights)
        want = library.pack(placement, x, ids, weights)
        requests = got.requests
        assert list(requests) == list(want.requests)  # the same shards, in the same order (most rows first)
        for shard, request in requests.items():
            other = want.requests[shard]
            for name in ("x", "expert_ids", "weights"):
                assert torch.equal(getattr(request, name), getattr(other, name)), (shard, name)
                assert getattr(request, name).dtype == getattr(other, name).dtype
            assert request.reply_into.shape == other.reply_into.shape == request.x.shape
            assert torch.equal(got.token_of(shard), want.token_of(shard))
        # (the compiled result is set by its first add: see the sums' test below)
        assert got.result.shape == want.result.shape == x.shape and got.result.dtype == dtype and not want.result.any()
        # each slot's weight and id went to exactly one shard
        slots_sent = sum(int((r.expert_ids >= 0).sum()) for r in requests.values())
        assert slots_sent == tokens * k
    assert compiled.load_counts() == library.load_counts()
    assert sum(compiled.tokens_sent) == sum((1, 7, 32, 33)) * k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_compiled_add_matches_index_add_into_zeros_bit_for_bit(kernel, dtype):
    # As dispatch adds: each shard's answer once, its tokens distinct and in order, the shards one
    # after another, the first into a result nothing has zeroed (index_add_ itself sums a repeated
    # index in float before rounding, in bfloat16 and float16).
    gen = torch.Generator().manual_seed(7)
    got = torch.full((9, 48), float("nan"), dtype=dtype)  # what an uninitialised result may hold
    want = torch.zeros(9, 48, dtype=dtype)
    tokens = [torch.randperm(9, generator=gen)[:count].sort().values for count in (5, 6, 4)]
    token = torch.cat(tokens)  # [15]: the three answers' rows back to back, as the pack lays them
    rows = (torch.randn(15, 48, generator=gen) * 100).to(dtype)
    rows[0, 0] = -0.0  # added to zeros it is +0.0
    start = 0
    for i, part in enumerate(tokens):
        kernel.add_rows_at(got, token, rows, start, len(part), i == 0)
        want.index_add_(0, part, rows[start:start + len(part)])
        start += len(part)
    assert torch.equal(got, want) and not got.isnan().any()
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    assert torch.equal(got.view(bits), want.view(bits))  # bits too: -0.0 added to zeros is +0.0


@pytest.mark.parametrize("k, placement", [
    (2, Placement.contiguous(8, 2, capacity=4)),
    (2, Placement.contiguous(8, 4, capacity=3).with_replica(0, 2)),
    (3, Placement.contiguous(6, 3)),
], ids=["2-shards", "4-shards-replicated", "3-slots"])
def test_the_compiled_call_sums_the_answers_as_the_library_call_does(kernel, k, placement):
    for seed, tokens in enumerate((1, 9, 32)):
        x, ids, weights = gated(tokens, placement.num_experts, k, torch.float32, seed)
        calls = [ShardClient(placement, InProcessTransport([]), compiled=c).pack(placement, x, ids, weights) for c in (True, False)]
        gen = torch.Generator().manual_seed(seed)
        answers = {s: torch.randn(r.x.shape[0], 32, generator=gen) for s, r in calls[1].requests.items()}
        for call in calls:
            for shard in reversed(list(call.requests)):  # an order other than the requests'
                call.land(shard, ShardReply(answers[shard], 0.0))
                call.add(shard)
        assert torch.equal(calls[0].result, calls[1].result)
        with pytest.raises(ShardUnavailableError, match="answered"):  # an answer of the wrong size is refused
            shard = next(iter(calls[0].requests))
            calls[0].land(shard, ShardReply(torch.zeros(calls[0].requests[shard].rows + 1, 32), 0.0))


def test_the_compiled_kernel_refuses_what_it_cannot_index(kernel):
    x, weights = torch.randn(2, 8), torch.rand(2, 2)
    first_holder = torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="expert id 4 is not in"):
        kernel.pack(x, torch.tensor([[0, 4], [1, 2]]), weights, first_holder, None, 2)
    with pytest.raises(RuntimeError, match="shard 2 is not in"):
        kernel.pack(x, torch.tensor([[0, 3], [1, 2]]), weights, first_holder, torch.tensor([[0, 2], [1, 1]]), 2)
    with pytest.raises(RuntimeError, match="weights must be"):
        kernel.pack(x, torch.tensor([[0, 3], [1, 2]]), weights.double(), first_holder, None, 2)
    result = torch.zeros(3, 8)
    with pytest.raises(RuntimeError, match="token 3 is not in"):
        kernel.add_rows_at(result, torch.tensor([0, 3]), torch.ones(2, 8), 0, 2, False)
    with pytest.raises(RuntimeError, match="rows must be"):
        kernel.add_rows_at(result, torch.tensor([0, 1]), torch.ones(2, 7), 0, 2, False)
    with pytest.raises(RuntimeError, match=r"rows \[1, 3\) are not in"):
        kernel.add_rows_at(result, torch.tensor([0, 1]), torch.ones(2, 8), 1, 2, False)
    with pytest.raises(RuntimeError, match="increasing order"):
        kernel.add_rows_at(result, torch.tensor([1, 0]), torch.ones(2, 8), 0, 2, True)
    assert not result.any()  # nothing was added before the refusal


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).flatten()


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 32), (torch.bfloat16, 64), (torch.bfloat16, 3), (torch.float32, 0)])
def test_each_compiled_request_lies_as_the_channel_sends_it(kernel, dtype, dim):
    # x, then ids, then weights, back to back in one frame, unless x's rows leave the ids off an
    # 8-byte boundary: then three frames. The reply frame is the memory of reply_into.
    placement = Placement.contiguous(8, 4, capacity=2)
    client = ShardClient(placement, InProcessTransport([]))
    library = ShardClient(placement, InProcessTransport([]), compiled=False)
    whole = 0
    for seed, tokens in enumerate((1, 6, 21, 40)):
        x, ids, weights = gated(tokens, 8, 2, dtype, seed, dim)
        want = library.pack(placement, x, ids, weights).requests
        for shard, request in client.pack(placement, x, ids, weights).requests.items():
            assert isinstance(request, PackedRequest)
            for name in ("x", "expert_ids", "weights"):
                assert torch.equal(getattr(request, name), getattr(want[shard], name))
            sent = b"".join(bytes(frame) for frame in request.frames)
            assert sent == b"".join(bytes(as_bytes(t).numpy()) for t in (request.x, request.expert_ids, request.weights))
            assert all(frame.readonly for frame in request.frames)
            if len(request.frames) == 1:
                whole += 1
            else:
                assert len(request.frames) == 3 and (request.rows * dim * dtype.itemsize) % 8
            assert len(request.reply_frame) == request.rows * dim * dtype.itemsize and not request.reply_frame.readonly
            if dim:
                request.reply_frame[:dtype.itemsize] = as_bytes(torch.ones(1, dtype=dtype)).numpy().tobytes()
                assert request.reply_into[0, 0] == 1  # the same memory
    assert whole > 0


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 32), (torch.bfloat16, 3)])
def test_compiled_requests_reach_the_shards_as_the_library_path_s_do(kernel, dtype, dim):
    placement = Placement.contiguous(8, 2, capacity=4)
    seen: dict[int, list] = {0: [], 1: []}

    def recorder(shard: int):
        def compute(layer, x, ids, weights):
            seen[shard].append((x.clone(), ids.clone(), weights.clone()))
            return x * 2
        return compute

    servers = [ShardServer(recorder(s)) for s in range(2)]
    transport = TcpTransport({s: srv.address for s, srv in enumerate(servers)})
    try:
        x, ids, weights = gated(13, 8, 2, dtype, 5, dim)
        for compiled in (True, False):
            remote = RemoteExperts(0, 8, ShardClient(placement, transport, compiled=compiled))
            remote(x, ids, weights)
        for shard in (0, 1):
            (a, b) = seen[shard]  # one request from each path
            assert all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(a, b))
    finally:
        transport.close()
        for srv in servers:
            srv.close()


def test_the_compiled_pack_takes_strided_inputs_and_no_tokens_like_the_library_path(kernel):
    placement = Placement.contiguous(8, 4, capacity=3).with_replica(0, 2)
    compiled = ShardClient(placement, InProcessTransport([]), compiled=True)
    library = ShardClient(placement, InProcessTransport([]), compiled=False)
    x, ids, weights = gated(9, 8, 2, torch.float32, 3)
    ids[:, 0] = 0  # the copied expert in every token
    strided = (x.t().contiguous().t(), ids.t().contiguous().t(), weights.t().contiguous().t())
    assert not any(t.is_contiguous() for t in strided)
    for inputs in (strided, (x[:0], ids[:0], weights[:0])):
        got, want = compiled.pack(placement, *inputs), library.pack(placement, *inputs)
        assert list(got.requests) == list(want.requests)
        for shard, request in got.requests.items():
            other = want.requests[shard]
            assert torch.equal(request.x, other.x) and torch.equal(request.expert_ids, other.expert_ids)
            assert torch.equal(request.weights, other.weights) and torch.equal(got.token_of(shard), want.token_of(shard))
        assert got.result.shape == want.result.shape == inputs[0].shape
    assert compiled.load_counts() == library.load_counts()


def test_dispatch_refuses_ids_or_weights_of_another_dtype_on_either_path():
    placement = Placement.contiguous(8, 2, capacity=4)
    x, ids, weights = gated(3, 8, 2, torch.float32, 0)
    for compiled in (True, False):
        client = ShardClient(placement, InProcessTransport([]), compiled=compiled)
        for bad in ((x, ids.int(), weights), (x, ids, weights.double())):
            with pytest.raises(MixserveError, match="int64 expert ids and weights in x's dtype"):
                client.pack(placement, *bad)


def test_the_compiled_add_refuses_a_strided_or_overlapping_result(kernel):
    result = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="result must be contiguous"):
        kernel.add_rows_at(result.t(), torch.tensor([0]), torch.ones(1, 4), 0, 1, False)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        kernel.add_rows_at(result, torch.tensor([1, 2]), result[:2], 0, 2, False)  # rows that the add itself changes
    assert not result.any()


def test_a_build_lock_left_by_a_killed_build_is_removed_when_stale(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_module, "SOURCE", tmp_path / "not_cpp.cpp")
    (tmp_path / "not_cpp.cpp").write_text("this is not C++;\n")  # fails at once: the test is about the lock
    lock = tmp_path / kernel_module.module_name() / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - kernel_module.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    built = []
    with caplog.at_level(logging.WARNING, logger=kernel_module.__name__):
        builder = threading.Thread(target=lambda: built.append(kernel_module._build()), daemon=True)
        builder.start()
        builder.join(timeout=120)  # torch waits on a lock for ever: kept, the build would never come back
    assert built == [None]  # a build was tried (and failed at once)
    assert any("stale build lock" in r.getMessage() for r in caplog.records)


def test_a_machine_that_cannot_build_the_kernel_says_why_and_dispatches_without_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # never the real cache (nor its lock)
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")  # fails at once, before any header is read
    monkeypatch.setattr(kernel_module, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger=kernel_module.__name__):
        assert kernel_module._build() is None
    (record,) = [r for r in caplog.records if r.name == kernel_module.__name__]
    assert "dispatching through numpy and torch" in record.getMessage()
    if shutil.which("ninja") and shutil.which("c++"):  # the compiler ran: its own reason, not its whole log
        assert "error:" in record.getMessage() and "\n" not in record.getMessage()
    monkeypatch.setattr(kernel_module, "_built", [None])  # as dispatch_kernel() then answers
    placement = Placement.contiguous(8, 2, capacity=4)
    client = ShardClient(placement, InProcessTransport([]))
    assert client.kernel is None
    x, ids, weights = gated(5, 8, 2, torch.float32, 0)
    call = client.pack(placement, x, ids, weights)
    for shard in call.requests:  # each shard gets the tokens with a slot on one of its experts
        held = torch.isin(ids, torch.tensor(placement.experts_of(shard))).any(dim=1)
        assert call.token_of(shard).tolist() == held.nonzero().flatten().tolist()
    assert sum(int((r.expert_ids >= 0).sum()) for r in call.requests.values()) == 10


def test_a_compiled_call_s_buffers_go_with_it_without_the_cycle_collector(kernel):
    # A prefill's buffers are hundreds of MB a layer: they must go when the call does, not wait for
    # a collection (requests pointing back at their call would make a cycle).
    import gc
    import weakref

    placement = Placement.contiguous(8, 2, capacity=4)
    client = ShardClient(placement, InProcessTransport([]))
    x, ids, weights = gated(12, 8, 2, torch.float32, 1)
    gc.disable()
    try:
        call = client.pack(placement, x, ids, weights)
        _ = [r.x for r in call.requests.values()]  # the lazy views too
        buffers = [weakref.ref(call.blocks), weakref.ref(call.replies), weakref.ref(call.result)]
        del call, _
        assert [ref() for ref in buffers] == [None, None, None]
    finally:
        gc.enable()
