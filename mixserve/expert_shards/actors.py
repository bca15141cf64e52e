"""Expert shards as Ray actors, gang-placed, and the Ray actor-call transport.

Payloads travel as numpy arrays: Ray serialises them zero-copy through its object store and
measured about half the round trip of torch tensors for the same bytes (issue notes: 1.2 ms
vs 2.7 ms for 8x1024 float32 each way on this kind of machine). numpy has no bfloat16, so a
bfloat16 tensor travels as its raw 16-bit words and is viewed back on arrival (see WireArray).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mixserve.expert_shards.channel import ShardServer
from mixserve.expert_shards.cpu_pinning import cores_for_slot, cpu_slot, pin_this_process
from mixserve.expert_shards.dispatch import Arrived, ShardReply, ShardRequest, ShardUnavailableError, report_arrivals
from mixserve.expert_shards.placement import Placement
from mixserve.expert_shards.shard import ExpertShard, ShardInfo
from mixserve.model.allocator import keep_freed_memory
from mixserve.model.weights_source import WeightsSource


# A numpy array plus the torch dtype it stands for: numpy lacks bfloat16, whose bits travel as int16.
WireArray = tuple[np.ndarray, str]
_CARRIED_AS = {torch.bfloat16: torch.int16}


def to_wire(t: torch.Tensor) -> WireArray:
    carrier = _CARRIED_AS.get(t.dtype)
    arr = (t.contiguous().view(carrier) if carrier is not None else t.contiguous()).numpy()
    return arr, str(t.dtype).removeprefix("torch.")


def from_wire(wire: WireArray) -> torch.Tensor:
    """A writable tensor of the sent dtype (Ray's object-store views are read-only: copied)."""
    arr, dtype_name = wire
    t = torch.from_numpy(np.array(arr))
    dtype = getattr(torch, dtype_name)
    return t.view(dtype) if dtype in _CARRIED_AS else t


class ExpertShardActor:
    """The Ray-facing face of an ExpertShard. Ray manages its life and control calls; token
    groups arrive on its TCP channel (channel.py), or as numpy through `compute`."""

    def __init__(self, shard_id: int, checkpoint: str | WeightsSource, experts: list[int], dtype: str, num_threads: int | None,
                 moe_kernel: str = "auto", cpu_slot: tuple[int, int] | None = None):
        # cpu_slot: (this shard's rank among the node's shards, how many there are) to pin to
        # cores of its own (cpu_pinning.py); first, so that every thread started later inherits it.
        self._cpus: tuple[int, ...] = ()
        if cpu_slot is not None and hasattr(os, "sched_getaffinity"):  # Linux
            cores = cores_for_slot(cpu_slot[0], shard_threads(num_threads), sorted(os.sched_getaffinity(0)), cpu_slot[1])
            if pin_this_process(cores):
                self._cpus = cores
        if num_threads:
            torch.set_num_threads(num_threads)
        keep_freed_memory()  # token groups' temporaries reuse the heap (mixserve/model/allocator.py)
        self._shard = ExpertShard(shard_id, checkpoint, experts, dtype, moe_kernel)
        # add_expert publishes a new expert only after its weights are in place, so the
        # channel's thread may compute while Ray's thread loads.
        self._server = ShardServer(self._shard.compute, host=ray.util.get_node_ip_address())

    def info(self) -> ShardInfo:
        """The shard's experts and channel address; also its health check (the router's)."""
        if not self._server.serving:
            raise RuntimeError(f"expert shard {self._shard.shard_id}: its data channel stopped")
        return replace(self._shard.info(), address=self._server.address, cpus=self._cpus)

    def add_expert(self, expert: int) -> ShardInfo:
        self._shard.add_expert(expert)
        return self.info()

    def weights_report(self) -> dict:
        """What loading cost this shard (bytes fetched, from where)."""
        return self._shard.weights.report()

    def compute(self, layer: int, x: WireArray, expert_ids: WireArray, weights: WireArray) -> tuple[WireArray, float]:
        """(this shard's weighted outputs, seconds spent computing them); see ExpertShard.compute."""
        start = time.perf_counter()
        out = self._shard.compute(layer, from_wire(x), from_wire(expert_ids), from_wire(weights))
        return to_wire(out), time.perf_counter() - start


class RayActorTransport:
    """One actor call per shard per layer, all in flight at once; a dead or silent shard
    becomes a ShardUnavailableError within `timeout_s` instead of a hang."""

    def __init__(self, actors: dict[int, ray.actor.ActorHandle], timeout_s: float = 30.0):
        self.actors = actors
        self.timeout_s = timeout_s

    def submit(self, layer: int, requests: dict[int, ShardRequest]) -> tuple[int, dict]:
        refs = {
            sid: self.actors[sid].compute.remote(layer, to_wire(r.x), to_wire(r.expert_ids), to_wire(r.weights))
            for sid, r in requests.items()
        }
        return layer, refs

    def collect(self, pending: tuple[int, dict], arrived: Arrived | None = None) -> dict[int, ShardReply]:
        layer, refs = pending
        try:
            outs = ray.get(list(refs.values()), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            for ref in refs.values():  # nothing may keep computing for a step that is abandoned
                ray.cancel(ref)
            raise ShardUnavailableError(f"expert shards did not answer layer {layer} within {self.timeout_s:.0f}s") from exc
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise ShardUnavailableError(f"expert shard failed during layer {layer}: {type(exc).__name__}") from exc
        # from_wire copies Ray's read-only object-store views; [T, D] is cheap next to the hop.
        return report_arrivals({sid: ShardReply(from_wire(out), seconds) for sid, (out, seconds) in zip(refs, outs)}, arrived)


# How long a restarting shard waits for its bundle to be placed on a live node before it starts
# without pinning (the actor itself waits for the bundle however long it takes).
BUNDLE_PLACED_TIMEOUT_S = 30.0


@dataclass
class ShardGroup:
    """A whole set of shard actors, started together or not at all."""

    placement: Placement
    actors: dict[int, ray.actor.ActorHandle]
    placement_group: PlacementGroup
    start_args: dict
    infos: dict[int, ShardInfo] = field(default_factory=dict)  # as each shard reported at start
    # shard -> (node, CPU slot) its running actor was given (cpu_pinning.cpu_slot), when pinning
    cpu_slots: dict[int, tuple[str, int]] = field(default_factory=dict)

    def start_actor(self, shard_id: int, experts: list[int]) -> ray.actor.ActorHandle:
        """Starts shard `shard_id` in its own bundle of the group's placement group (a restart:
        after `release_cpu_slots` of every dead shard, so that their cores are free again)."""
        args = self.start_args
        slot = None
        if args["pin_cpus"]:
            bundle_nodes = self._live_bundle_nodes(shard_id)
            slot = cpu_slot(shard_id, bundle_nodes, self.cpu_slots)
            if slot is not None:
                self.cpu_slots[shard_id] = (bundle_nodes[shard_id], slot[0])
        return ray.remote(ExpertShardActor).options(
            num_cpus=args["cpus_per_shard"],
            num_gpus=args["gpus_per_shard"],
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=shard_id),
        ).remote(shard_id, args["checkpoint"], experts, args["dtype"], args["num_threads"], args["moe_kernel"],
                 slot)

    def _live_bundle_nodes(self, shard_id: int) -> dict[int, str]:
        """Bundle -> node, for the bundles on live nodes, once shard_id's bundle is on one. Asked
        at every start: a dead node's bundles move to another node, a while after it died, and a
        slot chosen by the table before that would be one of the dead node's. {} (no pinning) if
        the bundle is not placed within BUNDLE_PLACED_TIMEOUT_S."""
        deadline = time.monotonic() + BUNDLE_PLACED_TIMEOUT_S
        while True:
            alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
            table = placement_group_table(self.placement_group).get("bundles_to_node_id") or {}
            if table.get(shard_id) in alive:
                return {bundle: node for bundle, node in table.items() if node in alive}
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.5)

    def release_cpu_slots(self, shards: list[int]) -> None:
        """The cores of shards that died are free for the shards restarting."""
        for shard in shards:
            self.cpu_slots.pop(shard, None)

    def shutdown(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)


def shard_threads(num_threads: int | None) -> int:
    """The torch threads a shard actor computes on: num_threads, else torch's default in the
    actor (Ray sets OMP_NUM_THREADS to the whole CPUs an actor reserves, at least one)."""
    return num_threads or torch.get_num_threads()


def start_shard_group(
    checkpoint: str | Path | WeightsSource,
    placement: Placement,
    dtype: str = "float32",
    cpus_per_shard: float = 1.0,
    gpus_per_shard: float = 0.0,
    num_threads: int | None = None,
    moe_kernel: str = "auto",
    ready_timeout_s: float = 300.0,
    pin_cpus: str = "auto",
) -> ShardGroup:
    """Reserves one bundle per shard in a placement group (gang scheduling: all shards fit or
    none starts), then starts each shard's actor in its bundle and waits until all loaded.
    pin_cpus 'auto': CPU shards pin themselves to cores of their own where their node has
    enough (cpu_pinning.py); 'off': never."""
    bundle = {"CPU": cpus_per_shard, **({"GPU": gpus_per_shard} if gpus_per_shard else {})}
    pg = placement_group([dict(bundle) for _ in range(placement.n_shards)], strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ShardUnavailableError(
            f"the cluster cannot fit {placement.n_shards} expert shards of {bundle} within {ready_timeout_s:.0f}s"
        ) from None
    group = ShardGroup(placement, {}, pg, dict(
        checkpoint=checkpoint, dtype=dtype, cpus_per_shard=cpus_per_shard,
        gpus_per_shard=gpus_per_shard, num_threads=num_threads, moe_kernel=moe_kernel,
        pin_cpus=pin_cpus == "auto" and not gpus_per_shard,
    ))
    try:
        for sid in range(placement.n_shards):
            group.actors[sid] = group.start_actor(sid, placement.experts_of(sid))
        infos = ray.get([a.info.remote() for a in group.actors.values()], timeout=ready_timeout_s)
        group.infos = dict(zip(group.actors, infos))
    except Exception:
        group.shutdown()
        raise
    return group
