"""Pinning CPU expert shards to cores of their own.

Why: on a node where the shards fill the cores, Linux often wakes two shards of the same layer
onto one core and leaves the other idle (a shard that ran there moments ago counts as cache-hot,
and an idle core that keeps waking for a few hundred microseconds skips the balancing that would
pull it over), so the second shard waits out the first one's whole compute. Traced on the 2-core
CI machine (perf sched, tiny-mixtral decode): a shard woken with ~0.9 ms of scheduling delay
while the other core sat idle for 0.8 ms, in 1 wake-up of 10. Pinned one core each (same run,
alternating rounds, decode at 32 sequences): tiny-mixtral 1816-1893 -> 2041-2160 tokens/s,
the dispatch's wait beyond the experts' compute 0.55 -> 0.26 ms; small-mixtral 211-216 ->
220 tokens/s. The attention replica stays unpinned: it runs between the shards' layers.

Shards take the node's highest-numbered cores first (core 0 tends to carry more of the
system's interrupts), each as many as it runs threads; a node without a core for every shard
thread pins none of them (pinning several shards to one core would serialise them). GPU shards
are left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


def node_local_slots(bundle_nodes: Mapping[int, str]) -> dict[int, int]:
    """Shard (bundle index) -> its rank among the shards on the same node, by shard id."""
    seen: dict[str, int] = {}
    slots = {}
    for shard in sorted(bundle_nodes):
        node = bundle_nodes[shard]
        slots[shard] = seen.get(node, 0)
        seen[node] = slots[shard] + 1
    return slots


def cores_for_slot(slot: int, threads: int, allowed: Sequence[int], shards_on_node: int) -> tuple[int, ...]:
    """The cores of the node's `slot`-th shard, highest first; () when the node's shards, at
    `threads` cores each, do not all fit in `allowed` (then none is pinned)."""
    if threads < 1 or shards_on_node * threads > len(allowed):
        return ()
    cores = sorted(allowed, reverse=True)
    return tuple(sorted(cores[slot * threads:(slot + 1) * threads]))


def pin_this_process(cores: Sequence[int]) -> bool:
    """Restricts every thread of this process to `cores` (threads started later inherit it).
    False, with a log line, where the OS refuses or has no such call."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # this thread only
    try:
        for tid in threads:
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
    except OSError as exc:
        log.warning("could not pin this expert shard to cores %s: %s", list(cores), exc)
        return False
    return True
