"""Expert shards as real Ray actors on a local cluster: same results, bounded failure."""

from __future__ import annotations

import time

import pytest
import torch

from mixserve import LLM, SamplingParams
from mixserve.expert_shards.actors import RayActorTransport, start_shard_group
from mixserve.expert_shards.channel import TcpTransport
from mixserve.expert_shards.dispatch import ShardClient, ShardRequest, ShardUnavailableError, remote_feed_forward
from mixserve.expert_shards.shard import ExpertShard
from mixserve.expert_shards.placement import Placement
from mixserve.model import load_model
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.tokenizer import Tokenizer


TRANSPORTS = ["tcp", "ray"]


def transport_to(group, kind: str, timeout_s: float):
    if kind == "tcp":
        return TcpTransport({sid: info.address for sid, info in group.infos.items()}, timeout_s=timeout_s)
    return RayActorTransport(group.actors, timeout_s=timeout_s)


def engine_over(group, folder, transport="tcp", timeout_s=20.0, micro_batches=1):
    client = ShardClient(group.placement, transport_to(group, transport, timeout_s))
    model = load_model(folder, max_positions=256, feed_forward_factory=remote_feed_forward(client))
    config = EngineConfig(max_model_len=256, max_num_batched_tokens=48, micro_batches=micro_batches)
    return LLMEngine(model, Tokenizer.from_checkpoint(folder), config)


@pytest.mark.parametrize("transport, micro_batches", [("tcp", 1), ("ray", 1), ("tcp", 2)])
def test_ray_shard_actors_give_the_single_process_tokens(ray_cluster, mixtral_dir, transport, micro_batches):
    placement = Placement.contiguous(8, 4, capacity=3).with_replica(5, 0)
    group = start_shard_group(mixtral_dir, placement, cpus_per_shard=1, num_threads=1)
    try:
        engine = engine_over(group, mixtral_dir, transport, micro_batches=micro_batches)
        gen = torch.Generator().manual_seed(9)
        prompts = [[1] + torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (6, 33, 12)]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        final = {}
        while engine.has_unfinished():
            final.update({o.request_id: o for o in engine.step() if o.finished})
        expected = LLM(mixtral_dir, max_model_len=256).generate(prompts, params)
        for i, exp in enumerate(expected):
            assert final[str(i)].token_ids == exp.token_ids
            for a, b in zip(final[str(i)].logprobs, exp.logprobs):
                assert abs(next(iter(a.values())) - next(iter(b.values()))) < 1e-4
    finally:
        group.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_shard_fails_the_step_quickly_with_a_retryable_error(ray_cluster, mixtral_dir, transport):
    ray = ray_cluster
    group = start_shard_group(mixtral_dir, Placement.contiguous(8, 2), cpus_per_shard=1, num_threads=1)
    try:
        engine = engine_over(group, mixtral_dir, transport, timeout_s=10.0)
        engine.add_request("r", [1, 100, 200, 300], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
        engine.step()
        engine.step()
        ray.kill(group.actors[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(ShardUnavailableError):
            for _ in range(5):
                engine.step()
        assert time.monotonic() - start < 5.0  # a dropped connection fails fast, well before the timeout
        assert engine.abort("r") and engine.scheduler.slots.n_free == engine.scheduler.slots.n_slots
    finally:
        group.shutdown()
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bfloat16_token_groups_cross_either_transport(ray_cluster, mixtral_dir, transport):
    # numpy has no bfloat16: the actor transport carries its bits, the channel its bytes; either
    # way a shard's answer equals the same experts computed in this process.
    placement = Placement.contiguous(8, 2)
    group = start_shard_group(mixtral_dir, placement, dtype="bfloat16", cpus_per_shard=1, num_threads=1)
    try:
        channel = transport_to(group, transport, timeout_s=20.0)
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
        ids = torch.tensor([[0, 5], [1, 2], [6, 7], [3, 0], [2, 4]])
        weights = torch.rand(5, 2, generator=gen).to(torch.bfloat16)
        requests = {s: ShardRequest(x, torch.where((ids >= 4 * s) & (ids < 4 * s + 4), ids, -1),
                                    torch.where((ids >= 4 * s) & (ids < 4 * s + 4), weights, 0)) for s in (0, 1)}
        replies = channel.collect(channel.submit(1, requests))
        whole = ExpertShard(9, mixtral_dir, list(range(8)), dtype="bfloat16").compute(1, x, ids, weights)
        got = replies[0].output + replies[1].output
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), whole.float(), atol=2e-2, rtol=2e-2)
    finally:
        group.shutdown()
