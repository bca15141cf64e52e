"""The disaggregated math path in one process: shards + dispatch give the engine's results."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mixserve import LLM, SamplingParams
from mixserve.errors import CheckpointError
from mixserve.expert_shards.dispatch import (
    MAX_UNCOUNTED_CALLS,
    InProcessTransport,
    RemoteExperts,
    ShardClient,
    ShardReply,
    ShardUnavailableError,
    remote_feed_forward,
    report_arrivals,
)
from mixserve.expert_shards.placement import Placement
from mixserve.expert_shards.shard import ExpertShard
from mixserve.model import load_model
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.tokenizer import Tokenizer


def disaggregated_llm_engine(folder, placement: Placement, **config) -> tuple[LLMEngine, ShardClient, list[ExpertShard]]:
    shards = [ExpertShard(s, folder, placement.experts_of(s)) for s in range(placement.n_shards)]
    client = ShardClient(placement, InProcessTransport(shards))
    model = load_model(folder, max_positions=256, feed_forward_factory=remote_feed_forward(client))
    engine = LLMEngine(model, Tokenizer.from_checkpoint(folder), EngineConfig(max_model_len=256, **config))
    return engine, client, shards


def run_all(engine: LLMEngine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[str(i)] for i in range(len(prompts))]


def test_four_shards_with_a_replicated_expert_match_the_single_process_engine(mixtral_dir):
    placement = Placement.contiguous(8, 4, capacity=3).with_replica(0, 2)
    engine, client, shards = disaggregated_llm_engine(mixtral_dir, placement, max_num_batched_tokens=48)
    gen = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (5, 40, 17, 3)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=True)
    got = run_all(engine, prompts, params)
    expected = LLM(mixtral_dir, max_model_len=256, max_num_batched_tokens=48).generate(prompts, params)
    for a, b in zip(got, expected):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x[next(iter(x))] - y[next(iter(x))]) < 1e-4
    # every shard did work, and both holders of expert 0 were used
    assert all(n > 0 for n in client.tokens_sent)


def slots(expert_ids: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] as a tensor, and gate weights for them (0 where the id is -1)."""
    ids = torch.tensor(expert_ids)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed))
    return ids, weights.masked_fill(ids < 0, 0)


def test_a_shard_reads_only_its_own_experts(mixtral_dir):
    shard = ExpertShard(0, mixtral_dir, [2, 5])
    full = ExpertShard(1, mixtral_dir, list(range(8)))
    assert shard.weight_bytes * 4 == full.weight_bytes
    x = torch.randn(3, 64)
    ids, weights = slots([[5, 2], [-1, 5], [2, -1]])
    for layer in (0, 3):
        a = shard.compute(layer, x, ids, weights)
        b = full.compute(layer, x, ids, weights)
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("moe_kernel", ["torch", "auto"])
def test_two_shards_partial_sums_add_up_to_the_whole_layer(mixtral_dir, moe_kernel):
    """Each token's slots split over two shards (ids -1 where the other computes): the shards'
    weighted rows add up to what one shard holding all experts gives, whichever kernel runs."""
    low = ExpertShard(0, mixtral_dir, [0, 1, 2, 3], moe_kernel=moe_kernel)
    high = ExpertShard(1, mixtral_dir, [4, 5, 6, 7], moe_kernel=moe_kernel)
    full = ExpertShard(2, mixtral_dir, list(range(8)), moe_kernel=moe_kernel)
    ids, weights = slots([[1, 6], [3, 0], [7, 4], [2, 5], [6, 2]], seed=1)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    mine = ids < 4
    parts = low.compute(1, x, ids.masked_fill(~mine, -1), weights.masked_fill(~mine, 0))
    parts = parts + high.compute(1, x, ids.masked_fill(mine, -1), weights.masked_fill(mine, 0))
    whole = full.compute(1, x, ids, weights)
    assert torch.allclose(parts, whole, atol=1e-5), (parts - whole).abs().max()
    assert not torch.allclose(whole, torch.zeros_like(whole))


@pytest.mark.parametrize("placement", [
    Placement.contiguous(8, 2, capacity=4),
    Placement.contiguous(8, 8, capacity=1),
    Placement.contiguous(8, 4, capacity=3).with_replica(0, 2),  # a hot expert's tokens split over 2 shards
], ids=["2-shards", "8-shards", "4-shards-replicated"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-pack", "library-pack"])
def test_remote_experts_give_the_whole_layer_and_each_shard_only_its_tokens(mixtral_dir, placement, compiled):
    shards = [ExpertShard(s, mixtral_dir, placement.experts_of(s)) for s in range(placement.n_shards)]
    transport = RecordingTransport(shards)
    remote = RemoteExperts(1, 8, ShardClient(placement, transport, compiled=compiled))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(24, 64, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(24)])
    weights = torch.rand(24, 2, generator=gen)
    got = remote(x, ids, weights)
    whole = ExpertShard(99, mixtral_dir, list(range(8))).compute(1, x, ids, weights)
    # 1e-5: with zentorch (the default where it works) a one-expert shard takes the plain-GEMM path
    # while the whole-layer shard runs the fused kernel, so float32 sums come in another order.
    assert torch.allclose(got, whole, atol=1e-5), (got - whole).abs().max()
    (requests,) = transport.requests
    for sid, request in requests.items():  # each shard got exactly the tokens with a slot there
        assert request.x.shape[0] == int((request.expert_ids >= 0).any(dim=1).sum()) > 0
    assert sum(int((r.expert_ids >= 0).sum()) for r in requests.values()) == 24 * 2  # every slot, once
    # a replicated expert's slots reach every shard holding it
    for expert, holders in enumerate(placement.holders):
        if not (ids == expert).any():
            continue
        got_it = sorted(sid for sid, r in requests.items() if (r.expert_ids == expert).any())
        assert got_it == list(holders)


def test_a_replicated_expert_is_split_over_its_holders_whatever_the_ids_layout():
    placement = Placement.contiguous(8, 4, capacity=3).with_replica(0, 2)
    rows = torch.tensor([[0, e] for e in (1, 2, 3, 4, 5, 6, 7, 1, 2, 3)])  # expert 0 in every token
    for ids in (rows, rows.t().contiguous().t()):  # row-major, and the same values column-major
        shard_of = ShardClient(placement, InProcessTransport([])).route(placement, ids.numpy())
        zero_goes_to = shard_of[ids.numpy() == 0]
        assert sorted(set(zero_goes_to.tolist())) == [0, 2]
        assert abs(int((zero_goes_to == 0).sum()) - int((zero_goes_to == 2).sum())) <= 1


@pytest.mark.parametrize("placement", [
    Placement.contiguous(8, 4, capacity=3),
    Placement.contiguous(8, 4, capacity=3).with_replica(0, 2),
], ids=["one-holder-each", "a-replicated-expert"])
@pytest.mark.parametrize("via", ["route", "compiled-pack"])
def test_the_load_counts_hold_every_slot_routed_even_read_while_routing(placement, via):
    # Counted when read, from what each call leaves behind (numpy arrays from route, tensors from
    # the compiled pack): a reader on another thread (the load reporter) loses nothing, and what
    # waits uncounted stays bounded when nobody reads.
    client = ShardClient(placement, InProcessTransport([]))
    gen = torch.Generator().manual_seed(0)
    expected_shards, expected_experts = np.zeros(4, dtype=np.int64), np.zeros(8, dtype=np.int64)
    stop, reads, errors = threading.Event(), [], []

    def read() -> None:
        try:
            while not stop.wait(0.0002):
                shards, experts = client.load_counts()
                reads.append(sum(shards))
                if sum(shards) != sum(experts):  # both over the same calls
                    errors.append((shards, experts))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(3000):
            first = torch.randint(0, 8, (5, 1), generator=gen)
            ids = torch.cat([first, (first + torch.randint(1, 8, (5, 1), generator=gen)) % 8], dim=1)  # distinct pairs
            if via == "route":
                shard_of = client.route(placement, ids.numpy())
                expected_shards += np.bincount(shard_of.reshape(-1), minlength=4)
            else:
                requests = client.pack(placement, torch.zeros(5, 4), ids, torch.full((5, 2), 0.5)).requests
                for shard, request in requests.items():
                    expected_shards[shard] += int((request.expert_ids >= 0).sum())
            expected_experts += np.bincount(ids.reshape(-1).numpy(), minlength=8)
    finally:
        stop.set()
        reader.join()
    assert not errors
    assert len(set(reads)) > 10  # the reader really read while the calls went on
    assert client.tokens_sent == expected_shards.tolist()
    assert client.expert_tokens == expected_experts.tolist()

    unread = ShardClient(placement, InProcessTransport([]))
    for _ in range(1000):
        unread.route(placement, np.array([[1, 2], [3, 4]]))
        assert len(unread._uncounted) <= MAX_UNCOUNTED_CALLS
    assert unread.expert_tokens == [0, 1000, 1000, 1000, 1000, 0, 0, 0]


class ArrivingTwiceTransport(InProcessTransport):
    """Hands every answer over twice, or one from a shard nobody asked."""

    def __init__(self, shards, stranger: bool):
        super().__init__(shards)
        self.stranger = stranger

    def collect(self, pending, arrived=None):
        for shard, reply in pending.items():
            arrived(shard, reply)
            arrived(99 if self.stranger else shard, reply)
        return pending


@pytest.mark.parametrize("stranger", [False, True], ids=["twice", "a-shard-not-asked"])
def test_an_answer_handed_over_twice_or_from_a_stranger_is_never_added(mixtral_dir, stranger):
    placement = Placement.contiguous(8, 2, capacity=4)
    shards = [ExpertShard(s, mixtral_dir, placement.experts_of(s)) for s in range(2)]
    remote = RemoteExperts(0, 8, ShardClient(placement, ArrivingTwiceTransport(shards, stranger)))
    ids = torch.tensor([[0, 5], [1, 6]])
    with pytest.raises(ShardUnavailableError, match="unexpected answer"):
        remote(torch.randn(2, 64), ids, torch.rand(2, 2))


class OrderedAnswersTransport:
    """Answers each shard's rows with one value per shard, handed over in a chosen order."""

    def __init__(self, values: dict[int, float], order: list[int]):
        self.values, self.order = values, order

    def submit(self, layer, requests):
        return {shard: ShardReply(torch.full_like(r.x, self.values[shard]), 0.0) for shard, r in requests.items()}

    def collect(self, pending, arrived=None):
        for shard in self.order:
            arrived(shard, pending[shard])
        return pending


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_more_than_two_slots_a_token_the_sum_does_not_depend_on_which_shard_answers_first(dtype):
    # (1e8 + 1) - 1e8 == 0 but (1e8 - 1e8) + 1 == 1, so an arrival-order sum would differ; and the
    # compiled add and the torch one sum in the same order.
    placement = Placement.contiguous(6, 3)  # shard s holds experts 2s and 2s + 1
    values = {0: 1e8, 1: 1.0, 2: -1e8}
    ids, weights = torch.tensor([[0, 2, 4]]), torch.full((1, 3), 1 / 3, dtype=dtype)
    results = []
    for compiled in (True, False):
        for order in ([0, 1, 2], [0, 2, 1], [2, 1, 0]):
            remote = RemoteExperts(0, 6, ShardClient(placement, OrderedAnswersTransport(values, order), compiled=compiled))
            results.append(remote(torch.zeros(1, 4, dtype=dtype), ids, weights))
    assert all(torch.equal(r, results[0]) for r in results)
    assert results[0].tolist() == [[0.0] * 4]  # in shard order: (1e8 + 1) - 1e8


class DamagingTransport(InProcessTransport):
    """Computes every request, then damages the answers with `damage(replies)`."""

    def __init__(self, shards, damage):
        super().__init__(shards)
        self.damage = damage

    def collect(self, pending, arrived=None):
        return report_arrivals(self.damage(pending), arrived)


@pytest.mark.parametrize("damage", [
    lambda replies: dict(list(replies.items())[:-1]),
    lambda replies: {s: ShardReply(r.output[:, :1], r.compute_s) for s, r in replies.items()},
    lambda replies: {s: ShardReply(r.output[:1], r.compute_s) for s, r in replies.items()},
], ids=["an-answer-missing", "one-column", "one-row"])
def test_a_missing_or_misshapen_answer_fails_the_layer_instead_of_adding_garbage(mixtral_dir, damage):
    placement = Placement.contiguous(8, 2, capacity=4)
    shards = [ExpertShard(s, mixtral_dir, placement.experts_of(s)) for s in range(2)]
    remote = RemoteExperts(0, 8, ShardClient(placement, DamagingTransport(shards, damage)))
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(6)])
    with pytest.raises(ShardUnavailableError, match="expert shard . answered"):
        remote(torch.randn(6, 64, generator=gen), ids, torch.rand(6, 2, generator=gen))


def test_shard_refuses_experts_it_does_not_hold(mixtral_dir):
    shard = ExpertShard(0, mixtral_dir, [0, 1])
    with pytest.raises(ValueError, match="does not hold experts \\[3\\]"):
        shard.compute(0, torch.randn(1, 64), *slots([[3, 1]]))
    with pytest.raises(ValueError, match="expert ids must lie in"):
        shard.compute(0, torch.randn(1, 64), *slots([[8, 1]]))
    with pytest.raises(ValueError, match="bad shapes"):
        shard.compute(0, torch.randn(2, 64), *slots([[0, 1]]))


def test_dense_models_have_no_experts_to_shard(mistral_dir):
    with pytest.raises(CheckpointError, match="dense"):
        ExpertShard(0, mistral_dir, [0])


@pytest.mark.parametrize("moe_kernel", ["torch", "auto"])
def test_a_shard_can_take_a_replica_of_another_expert_at_run_time(mixtral_dir, moe_kernel):
    shard = ExpertShard(0, mixtral_dir, [0, 1], moe_kernel=moe_kernel)
    reference = ExpertShard(1, mixtral_dir, [6], moe_kernel=moe_kernel)
    info = shard.add_expert(6)
    assert info.experts == (0, 1, 6)
    x = torch.randn(4, 64)
    ids, weights = slots([[6, -1]] * 4)
    assert torch.allclose(shard.compute(2, x, ids, weights), reference.compute(2, x, ids, weights), atol=1e-6)
    ids, weights = slots([[1, 6], [6, 0], [-1, 1], [0, -1]])
    single = ExpertShard(2, mixtral_dir, [0, 1, 6], moe_kernel=moe_kernel)
    assert torch.allclose(shard.compute(2, x, ids, weights), single.compute(2, x, ids, weights), atol=1e-6)


class RecordingTransport(InProcessTransport):
    """Logs which experts each shard got per layer call, and the requests; can run a hook on one layer."""

    def __init__(self, shards, on_layer=None):
        super().__init__(shards)
        self.calls: list[tuple[int, dict[int, list[int]]]] = []
        self.requests: list[dict] = []
        self.on_layer = on_layer or {}

    def submit(self, layer, requests):
        self.requests.append(requests)
        self.calls.append((layer, {sid: sorted(set(r.expert_ids[r.expert_ids >= 0].tolist())) for sid, r in requests.items()}))
        if layer in self.on_layer:
            self.on_layer.pop(layer)()
        return super().submit(layer, requests)


def test_a_new_placement_takes_effect_at_the_next_step_never_mid_step(mixtral_dir):
    placement = Placement.contiguous(8, 2, capacity=5)  # shard 0: experts 0-3, shard 1: 4-7, one spare slot each
    shards = [ExpertShard(s, mixtral_dir, placement.experts_of(s)) for s in range(2)]
    shards[1].add_expert(0)  # the copy is loaded before the placement that uses it is published
    client = ShardClient(placement, InProcessTransport(shards))
    swap_at_layer_1 = {1: lambda: client.set_placement(placement.with_replica(0, 1))}
    client.transport = RecordingTransport(shards, on_layer=swap_at_layer_1)
    model = load_model(mixtral_dir, max_positions=256, feed_forward_factory=remote_feed_forward(client))
    engine = LLMEngine(model, Tokenizer.from_checkpoint(mixtral_dir), EngineConfig(max_model_len=256))
    prompt = [1] + torch.randint(3, 32000, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add_request("r", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    engine.step()  # the 61-token prefill: every expert is active in every layer
    n_layers = len(model.layers)
    first_step = client.transport.calls
    assert len(first_step) == n_layers and not swap_at_layer_1  # the swap happened during the first step
    assert all(0 not in experts.get(1, []) for _, experts in first_step)  # that step kept the old table
    engine.add_request("s", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    engine.step()  # decode of r + prefill of s, on the new table
    later = client.transport.calls[n_layers:]
    assert any(0 in experts.get(1, []) for _, experts in later)  # the copy on shard 1 now takes tokens


def threads_seen_by_ops(engine: LLMEngine) -> dict[str, set[int]]:
    """torch's intra-op thread count while each kind of op ran, over one decode run of the
    engine (in a fresh thread: torch's count is per thread)."""
    seen: dict[str, set[int]] = {"wqkv": set(), "wo": set(), "norm": set(), "lm_head": set()}
    model = engine.model
    modules = [("lm_head", model.output)] + [
        (name, module) for block in model.layers
        for name, module in (("wqkv", block.attention.wqkv), ("wo", block.attention.wo), ("norm", block.attention_norm))
    ]
    hooks = [m.register_forward_pre_hook(lambda _m, _x, name=name: seen[name].add(torch.get_num_threads()))
             for name, m in modules]

    def decode():
        torch.set_num_threads(1)
        run_all(engine, [[1, 415, 2936], [1, 22557, 28705, 28770]], SamplingParams(max_tokens=4, ignore_eos=True))

    worker = threading.Thread(target=decode)
    worker.start()
    worker.join()
    for hook in hooks:
        hook.remove()
    return seen


def test_with_remote_experts_heavy_op_threads_also_widen_the_attention_projections(mixtral_dir):
    # The shards wait while the replica projects, so those ops get the wide count; the rest stay narrow.
    remote, _, _ = disaggregated_llm_engine(mixtral_dir, Placement.contiguous(8, 2, capacity=4), heavy_op_threads=2)
    assert threads_seen_by_ops(remote) == {"wqkv": {2}, "wo": {2}, "norm": {1}, "lm_head": {2}}
    # In one process the experts are the heavy ops: the projections keep the step's count.
    local = LLM(mixtral_dir, max_model_len=256, heavy_op_threads=2).engine
    assert threads_seen_by_ops(local) == {"wqkv": {1}, "wo": {1}, "norm": {1}, "lm_head": {2}}
