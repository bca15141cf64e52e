"""Sending each MoE layer's token groups to the shards that hold their experts.

Shape legend: T = tokens, D = model dim, K = experts per token, A = T*K assignments.

Per layer and step: route (top-k gate, group by expert) in the attention replica, pick one
holder shard per active expert (least tokens so far this step, under the current placement),
send every shard its groups in one message, gather the unweighted outputs and combine them
with the gate weights locally. The router only publishes placements: data never goes
through it. A placement swap is atomic: a step reads `self.placement` once per layer call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from mixserve.errors import MixserveError
from mixserve.expert_shards.placement import Placement
from mixserve.expert_shards.shard import ExpertShard
from mixserve.model.moe import MoeLayer, combine, group_by_expert


class ShardUnavailableError(MixserveError):
    """A shard failed or timed out; the request is retryable once the shard is back."""


@dataclass
class ShardRequest:
    experts: list[int]  # in the order their rows appear in x
    counts: list[int]
    x: torch.Tensor  # [A_shard, D]


@dataclass
class ShardReply:
    output: torch.Tensor  # [A_shard, D] unweighted expert outputs, in the request's row order
    compute_s: float  # the shard's own compute time for this request


@dataclass
class DispatchStats:
    """Where the time of this replica's remote MoE layers goes, summed over layer calls."""

    calls: int = 0
    route_s: float = 0.0  # group by expert, split over holders, pack one buffer per shard
    send_s: float = 0.0  # hand the buffers to the transport
    wait_s: float = 0.0  # blocked until every answer is in (what ping-pong hides)
    expert_s: float = 0.0  # the slowest shard's own compute per call, as the shards report it
    combine_s: float = 0.0  # unpack and weighted scatter-add back to tokens

    def reset(self) -> None:
        self.__init__()


class Transport(Protocol):
    """Moves one layer's groups to shards and back. `submit` returns as soon as the requests
    are on their way (the caller may compute meanwhile: ping-pong micro-batches), `collect`
    waits for the answers. Implementations: in-process (tests, and the baseline for
    measuring), ZeroMQ channels (the default, see channel.py) and Ray actor calls; a GPU build
    adds NCCL behind the same calls."""

    def submit(self, layer: int, requests: dict[int, ShardRequest]) -> object:
        ...

    def collect(self, pending: object) -> dict[int, ShardReply]:
        ...


class InProcessTransport:
    """Shards living in this process: no serialisation, no hop (computes at submit)."""

    def __init__(self, shards: Sequence[ExpertShard]):
        self.shards = {s.shard_id: s for s in shards}

    def submit(self, layer, requests):
        replies = {}
        for sid, r in requests.items():
            start = time.perf_counter()
            out = self.shards[sid].compute(layer, r.experts, r.counts, r.x)
            replies[sid] = ShardReply(out, time.perf_counter() - start)
        return replies

    def collect(self, pending):
        return pending


class ShardClient:
    """What an attention replica knows of the expert side: the placement it dispatches by,
    the transport, and per-shard token counts (its share of the load picture)."""

    def __init__(self, placement: Placement, transport: Transport):
        self.placement = placement
        self.transport = transport
        self.tokens_sent = [0] * placement.n_shards  # cumulative per shard, reported to the router
        self.expert_tokens = [0] * placement.num_experts  # cumulative per expert
        self.stats = DispatchStats()

    def set_placement(self, placement: Placement) -> None:
        """Takes effect from the next layer call; calls in flight keep the table they read.
        (Placements only ever add copies of experts: the set of shards stays the same.)"""
        self.placement = placement

    def assign(self, placement: Placement, counts: list[int]) -> list[tuple[int, int, int]]:
        """(expert, shard, rows) parts for one layer call. Each expert's group is split evenly
        over the shards holding it (a replicated hot expert spreads its load at every step);
        the remainder rows, and single-holder groups, go to the least-loaded holders first.
        Largest groups are placed first; ties go to the shard with the fewest tokens so far."""
        load = [0] * placement.n_shards
        parts = []
        for expert in sorted((e for e, n in enumerate(counts) if n), key=lambda e: -counts[e]):
            holders = sorted(placement.holders[expert], key=lambda s: (load[s], self.tokens_sent[s], s))
            base, extra = divmod(counts[expert], len(holders))
            for i, shard in enumerate(holders):
                rows = base + (i < extra)
                if rows:
                    parts.append((expert, shard, rows))
                    load[shard] += rows
        return parts


class RemoteExperts(nn.Module):
    """The Experts of one layer, computed on shards (implements mixserve.model.moe.Experts)."""

    def __init__(self, layer: int, num_experts: int, client: ShardClient):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.client = client

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.start(x, expert_ids, weights)()

    def start(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Sends this layer's groups to the shards; the returned call waits and combines."""
        began = time.perf_counter()
        placement = self.client.placement  # read once: a swap mid-layer cannot split this call
        routing = group_by_expert(expert_ids, weights, self.num_experts)
        grouped_x = x[routing.token_index]  # [A, D], grouped by expert
        cursor = {e: start for e, start, _ in routing.segments()}  # next unassigned row of each group
        for expert, n in enumerate(routing.counts):
            self.client.expert_tokens[expert] += n

        parts: dict[int, list[tuple[int, int, int]]] = {}  # shard -> (expert, start, end) rows
        for expert, shard, n in self.client.assign(placement, routing.counts):
            start = cursor[expert]
            cursor[expert] = start + n
            parts.setdefault(shard, []).append((expert, start, start + n))
        requests = {
            shard: ShardRequest(
                experts=[e for e, _, _ in shard_parts],
                counts=[end - start for _, start, end in shard_parts],
                x=torch.cat([grouped_x[start:end] for _, start, end in shard_parts]),
            )
            for shard, shard_parts in parts.items()
        }
        for shard, req in requests.items():
            self.client.tokens_sent[shard] += req.x.shape[0]

        transport, stats = self.client.transport, self.client.stats
        routed = time.perf_counter()
        pending = transport.submit(self.layer, requests)
        sent = time.perf_counter()
        stats.calls += 1
        stats.route_s += routed - began
        stats.send_s += sent - routed

        def finish() -> torch.Tensor:
            waited = time.perf_counter()
            replies = transport.collect(pending)
            answered = time.perf_counter()
            outputs = torch.empty_like(grouped_x)
            for shard, reply in replies.items():
                offset = 0
                for _, start, end in parts[shard]:
                    outputs[start:end] = reply.output[offset : offset + end - start]
                    offset += end - start
            result = combine(outputs, routing, x.shape[0])
            stats.wait_s += answered - waited
            stats.expert_s += max((r.compute_s for r in replies.values()), default=0.0)
            stats.combine_s += time.perf_counter() - answered
            return result

        return finish


def remote_feed_forward(client: ShardClient):
    """The feed-forward factory of a model whose experts live on the shards behind `client`
    (pass it to mixserve.model.load_model)."""

    def build(args, layer: int) -> MoeLayer:
        experts = RemoteExperts(layer, args.num_experts, client)
        return MoeLayer(args.dim, args.num_experts, args.num_experts_per_tok, experts)

    return build
