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
system's interrupts), one hardware thread per physical core before any core's second thread
(where the sibling numbering is adjacent, plain order would hand two shards one core), each as
many as it runs threads; a node without a CPU for every shard thread pins none of them (pinning
several shards to one CPU would serialise them). GPU shards are left alone.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)


def cpu_slot(shard: int, bundle_nodes: Mapping[int, str], held: Mapping[int, tuple[str, int]]) -> tuple[int, int] | None:
    """(slot, shards on its node) for a shard actor about to start: the lowest slot on its
    bundle's node that no other running shard there holds (`held`: shard -> (node, slot) of the
    running actors); None where the bundle has no node. At a group's start, shards starting in
    id order get their rank on their node. Why not that rank at a restart too: a dead node's
    shards restart on a node whose shards keep the slots they were pinned with, and by rank a
    newcomer could take a running shard's cores."""
    node = bundle_nodes.get(shard)
    if node is None:
        return None
    taken = {slot for other, (where, slot) in held.items() if other != shard and where == node}
    slot = next(s for s in itertools.count() if s not in taken)
    return slot, sum(1 for where in bundle_nodes.values() if where == node)


def cores_for_slot(slot: int, threads: int, allowed: Sequence[int], shards_on_node: int,
                   sibling_rank: Callable[[int], int] | None = None) -> tuple[int, ...]:
    """The CPUs of the node's `slot`-th shard; () when the node's shards, at `threads` CPUs each,
    do not all fit in `allowed` (then none is pinned). Order of handing out: each CPU's rank
    among its core's hardware threads (sibling_rank, read from sysfs by default), then the
    highest number first."""
    if threads < 1 or shards_on_node * threads > len(allowed):
        return ()
    rank = sibling_rank or _sibling_rank
    cpus = sorted(allowed, key=lambda cpu: (rank(cpu), -cpu))
    return tuple(sorted(cpus[slot * threads:(slot + 1) * threads]))


def _sibling_rank(cpu: int) -> int:
    """0 for the lowest-numbered hardware thread of its physical core, 1 for the next...; 0
    where the OS does not say."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
            siblings = _cpu_list(f.read())
    except (OSError, ValueError):
        return 0
    return sorted(siblings).index(cpu) if cpu in siblings else 0


def _cpu_list(text: str) -> list[int]:
    """Linux's CPU list format: '0-3,8,10-11'."""
    cpus = []
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def pin_this_process(cores: Sequence[int]) -> bool:
    """Restricts every thread of this process to `cores` (threads started later inherit it).
    False, with a log line, where the OS refuses or has no such call."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError as exc:  # cannot see every thread: pin none rather than some
        log.warning("not pinning this expert shard: %s", exc)
        return False
    before = os.sched_getaffinity(0)
    done = []
    try:
        for tid in threads:
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
            done.append(tid)
    except OSError as exc:
        log.warning("could not pin this expert shard to cores %s: %s", list(cores), exc)
        for tid in done:  # all or nothing
            try:
                os.sched_setaffinity(tid, before)
            except OSError:
                pass
        return False
    return True
