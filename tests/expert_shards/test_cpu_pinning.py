"""CPU expert shards pinned to cores of their own: the slot arithmetic, and real shard actors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mixserve.expert_shards.actors import start_shard_group
from mixserve.expert_shards.cpu_pinning import _cpu_list, cores_for_slot, cpu_slot
from mixserve.expert_shards.placement import Placement

can_pin = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="this OS has no CPU affinity calls")


def start_in_order(bundle_nodes: dict[int, str], held: dict[int, tuple[str, int]], shards) -> dict[int, tuple[int, int]]:
    """What ShardGroup.start_actor does for each shard in turn: take a slot and hold it."""
    given = {}
    for shard in shards:
        given[shard] = cpu_slot(shard, bundle_nodes, held)
        held[shard] = (bundle_nodes[shard], given[shard][0])
    return given


def test_shards_starting_together_are_ranked_within_their_own_node():
    nodes = {0: "a", 1: "b", 2: "a", 3: "a", 4: "b"}
    given = start_in_order(nodes, {}, range(5))
    assert given == {0: (0, 3), 1: (0, 2), 2: (1, 3), 3: (2, 3), 4: (1, 2)}
    assert cpu_slot(5, nodes, {}) is None  # a bundle without a node


def test_a_dead_node_s_shards_restart_on_cores_the_running_shards_there_do_not_hold():
    # Node b died; its shards 0 and 1 restart on node a, where shards 2 and 3 run on slots 0 and 1.
    held = {2: ("a", 0), 3: ("a", 1)}
    moved = {0: "a", 1: "a", 2: "a", 3: "a"}
    given = start_in_order(moved, held, [0, 1])
    assert given == {0: (2, 4), 1: (3, 4)}  # (ranked by id they would take slots 0 and 1: shared cores)
    # One of them dies again on its own: it takes back the slot it let go.
    del held[1]
    assert cpu_slot(1, moved, held) == (3, 4)


@pytest.mark.parametrize("slot, threads, shards, expected", [
    (0, 1, 2, (3,)), (1, 1, 2, (2,)),  # the highest cores first
    (0, 2, 2, (2, 3)), (1, 2, 2, (0, 1)),  # a core per thread
    (0, 2, 3, ()), (2, 2, 3, ()),  # 6 threads on 4 cores: nobody is pinned
    (0, 0, 1, ()),
])
def test_each_shard_gets_cores_no_other_shard_of_its_node_gets(slot, threads, shards, expected):
    no_hyperthreads = lambda cpu: 0  # noqa: E731
    assert cores_for_slot(slot, threads, [0, 1, 2, 3], shards, no_hyperthreads) == expected


def test_physical_cores_come_before_any_core_s_second_thread():
    adjacent_siblings = lambda cpu: cpu % 2  # noqa: E731 - CPUs 0/1, 2/3, ... share a core
    firsts = [cores_for_slot(slot, 1, range(8), 6, adjacent_siblings) for slot in range(6)]
    assert firsts == [(6,), (4,), (2,), (0,), (7,), (5,)]


def test_linux_cpu_lists_are_read():
    assert _cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]


@can_pin
def test_pinning_covers_every_thread_of_the_process_and_the_ones_it_starts_later():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("with one CPU allowed, pinning to it changes nothing to see")
    core = max(os.sched_getaffinity(0))
    child = f"""
import os, threading
before = threading.Thread(target=threading.Event().wait, daemon=True); before.start()
from mixserve.expert_shards.cpu_pinning import pin_this_process
assert pin_this_process([{core}])
seen = []
later = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0)))); later.start(); later.join()
print(sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(before.native_id)), seen[0])
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split("\n")[0] == f"[{core}] [{core}] [{core}]"


def affinities(actor) -> list[list[int]]:
    """The CPU affinity of every thread of a shard actor's process."""
    import ray

    def every_thread(_self):
        return [sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")]

    return ray.get(actor.__ray_call__.remote(every_thread))


@can_pin
def test_cpu_shards_pin_to_cores_of_their_own_unless_told_not_to(ray_cluster, mixtral_dir):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 cores for 2 one-thread shards")
    placement = Placement.contiguous(8, 2)
    group = start_shard_group(mixtral_dir, placement, cpus_per_shard=1, num_threads=1)
    try:
        pinned = [group.infos[s].cpus for s in (0, 1)]
        expected = [cores_for_slot(slot, 1, allowed, 2) for slot in (0, 1)]  # this machine's topology
        assert pinned == expected and len(set(pinned)) == 2 and all(len(c) == 1 for c in pinned)
        for shard, cores in enumerate(pinned):
            assert all(threads == list(cores) for threads in affinities(group.actors[shard]))
    finally:
        group.shutdown()
    group = start_shard_group(mixtral_dir, placement, cpus_per_shard=1, num_threads=1, pin_cpus="off")
    try:
        assert [group.infos[s].cpus for s in (0, 1)] == [(), ()]
        assert sorted(set(map(tuple, affinities(group.actors[0])))) == [tuple(allowed)]
    finally:
        group.shutdown()
