"""The router on a real local Ray cluster: automatic rebalancing from reported load."""

from __future__ import annotations

import os
import time

import torch

from mixserve.expert_shards.router import ExpertRouter
from mixserve.model.moe_kernels import resolve_moe_kernel
from tests.waiting import wait_until


def test_auto_rebalance_copies_the_hot_expert_once_and_then_holds_still(ray_cluster, mixtral_dir):
    router = ExpertRouter(
        str(mixtral_dir), num_experts=8, n_shards=2, experts_per_shard=5, replicate_hottest=1,
        cpus_per_shard=0.5, num_threads=1, auto_rebalance_s=0.5,
    )
    try:
        assert router.placement().holders[1] == (0,)
        # replicas report expert 1 (on shard 0) carrying most tokens: shard 0 has 3x shard 1's load
        router.report_load([300, 100], [40, 220, 20, 20, 25, 25, 25, 25])
        deadline = time.monotonic() + 20
        while router.placement().version == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        placement = router.placement()
        assert placement.version == 1
        assert sorted(placement.holders[1]) == [0, 1]  # the hot expert got a copy on the cooler shard
        assert placement.version == router.status().placement_version
        # the same load again: no spare slot would lower max/mean further, so nothing flaps
        router.report_load([300, 100], [40, 220, 20, 20, 25, 25, 25, 25])
        time.sleep(5)
        assert router.placement().version == 1
    finally:
        router.shutdown()



def test_shards_start_with_the_first_replica_and_are_released_when_none_is_left(ray_cluster, mixtral_dir):
    ray = ray_cluster
    total = ray.cluster_resources()["CPU"]
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= total - 1e-6)  # earlier tests' actors gone
    cpus_before = ray.available_resources().get("CPU", 0)
    router = ExpertRouter(
        str(mixtral_dir), num_experts=8, n_shards=2, cpus_per_shard=0.5, num_threads=1, release_idle_s=1.0,
    )
    try:
        assert not router.status().running and router.shard_addresses() == {}  # nothing until a replica comes
        assert router.status().moe_kernel is None
        first = router.attach("replica-a")
        assert router.status().running and len(router.shard_addresses()) == 2
        # the shards' default kernel is the engine's: zentorch's fused layer where it works here
        assert router.status().moe_kernel == resolve_moe_kernel("auto", torch.float32, "cpu")
        # one-thread CPU shards pin to a core each where the node has two (cpu_pinning.py)
        pinned = router.status().cpus
        cores = [tuple(c) for c in pinned.values()]
        assert sorted(pinned) == [0, 1]
        if len(getattr(os, "sched_getaffinity", lambda _: ())(0)) >= 2:
            assert all(len(c) == 1 for c in cores) and len(set(cores)) == 2
        assert wait_until(lambda: ray.available_resources().get("CPU", 0) <= cpus_before - 1.0 + 1e-6)  # 2 x 0.5 CPU
        # heartbeats keep the group up past the idle period
        for _ in range(10):
            assert router.heartbeat("replica-a") == first.version
            time.sleep(0.3)
        assert router.status().running
        # silence: released within idle + one check period, and the resources go back
        assert wait_until(lambda: not router.status().running)
        assert wait_until(lambda: ray.available_resources().get("CPU", 0) >= cpus_before - 1e-6)
        # a heartbeat from a replica that is still there restarts them under a new placement version
        assert router.heartbeat("replica-a") == first.version + 1
        assert router.status().running and router.starts == 2
    finally:
        if router._group is not None:
            router.shutdown()


def test_hot_experts_get_copies_as_soon_as_the_attention_pool_grows(ray_cluster, mixtral_dir):
    # No periodic rebalancing at all: only the pool growing from one replica to two triggers it.
    router = ExpertRouter(
        str(mixtral_dir), num_experts=8, n_shards=2, experts_per_shard=5, replicate_hottest=1,
        cpus_per_shard=0.5, num_threads=1, moe_kernel="torch", auto_rebalance_s=0.0,
    )
    def beat(*replicas: str) -> bool:  # live replicas heartbeat every second or so
        for replica in replicas:
            router.heartbeat(replica)
        return False

    try:
        router.report_load([300, 100], [40, 220, 20, 20, 25, 25, 25, 25])  # expert 1 (shard 0) is hot
        wait_until(lambda: beat("replica-a"), 5, every_s=0.5)  # one replica, steady: nothing changes
        assert router.placement().version == 0
        # the pool grows to two replicas
        assert wait_until(lambda: beat("replica-a", "replica-b") or router.placement().version == 1, 15, every_s=0.5)
        assert sorted(router.placement().holders[1]) == [0, 1]
        assert router.status().attention_replicas == 2
        assert router.status().moe_kernel == "torch"  # as asked
    finally:
        router.shutdown()
