"""The router on a real local Ray cluster: automatic rebalancing from reported load."""

from __future__ import annotations

import time

from mixserve.expert_shards.router import ExpertRouter


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
        router._group.shutdown()
