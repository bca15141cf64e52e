"""Sending each MoE layer's token groups to the shards that hold their experts.

Shape legend: T = tokens, D = model dim, K = experts per token, A = T*K assignments.

Per layer and step: route (top-k gate, group by expert) in the attention replica, pick one
holder shard per active expert (least tokens so far this step, under the step's placement),
send every shard its groups in one message, gather the unweighted outputs and combine them
with the gate weights locally. The router only publishes placements: data never goes
through it. A placement swap is atomic per step: the model latches the client's placement at the
start of each step (`begin_step`), so a step in flight finishes on the table it began with.
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
from mixserve.model.moe import MoeLayer, group_by_expert


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
    to_shard_s: float = 0.0  # request on the wire: sent here -> fully received there
    from_shard_s: float = 0.0  # reply on the wire: sent there -> fully received here


@dataclass
class DispatchStats:
    """Where the time of this replica's remote MoE layers goes, summed over layer calls."""

    calls: int = 0
    route_s: float = 0.0  # group by expert, split over holders, pack one buffer per shard
    send_s: float = 0.0  # hand the buffers to the transport
    wait_s: float = 0.0  # blocked until every answer is in (what ping-pong hides)
    expert_s: float = 0.0  # the slowest shard's own compute per call, as the shards report it
    to_shard_s: float = 0.0  # the request's trip to the last shard to answer (wall clocks)
    from_shard_s: float = 0.0  # that shard's reply's trip back
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
        self.placement = placement  # the latest published
        self.step_placement = placement  # the one the current step dispatches by
        self.transport = transport
        self.tokens_sent = [0] * placement.n_shards  # cumulative per shard, reported to the router
        self.expert_tokens = [0] * placement.num_experts  # cumulative per expert
        self.stats = DispatchStats()

    def set_placement(self, placement: Placement) -> None:
        """Takes effect from the next step; the step in flight keeps the table it latched.
        (Placements only ever add copies of experts: the set of shards stays the same.)"""
        self.placement = placement

    def begin_step(self) -> None:
        """Latches the latest placement for the whole step about to run."""
        self.step_placement = self.placement

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

    def begin_step(self) -> None:
        self.client.begin_step()

    def start(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Sends this layer's groups to the shards; the returned call waits and combines."""
        began = time.perf_counter()
        placement = self.client.step_placement  # latched for the whole step (begin_step)
        routing = group_by_expert(expert_ids, weights, self.num_experts)
        cursor = {e: start for e, start, _ in routing.segments()}  # next unassigned row of each group
        for expert, n in enumerate(routing.counts):
            self.client.expert_tokens[expert] += n

        parts: dict[int, list[tuple[int, int]]] = {}  # shard -> (expert, rows), in send order
        send_order: list[int] = []  # grouped assignment rows, shard after shard
        for shard, expert, n in sorted((s, e, n) for e, s, n in self.client.assign(placement, routing.counts)):
            parts.setdefault(shard, []).append((expert, n))
            send_order.extend(range(cursor[expert], cursor[expert] + n))
            cursor[expert] += n
        order = torch.tensor(send_order, dtype=torch.long, device=x.device)
        token_rows = routing.token_index[order]  # [A]: source token of each row sent
        chunks = x[token_rows].split([sum(n for _, n in p) for p in parts.values()])  # one gather, views per shard
        requests = {
            shard: ShardRequest(experts=[e for e, _ in shard_parts], counts=[n for _, n in shard_parts], x=chunk)
            for (shard, shard_parts), chunk in zip(parts.items(), chunks)
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
            outputs = torch.cat([replies[shard].output for shard in parts])  # [A, D] in send order
            # Weighted scatter-add back to tokens; with two terms per token the order of the
            # additions cannot change the sum, so this equals the single-process combine.
            weighted = outputs * routing.weights[order][:, None].to(outputs.dtype)
            result = torch.zeros_like(x, dtype=outputs.dtype).index_add_(0, token_rows, weighted)
            stats.wait_s += answered - waited
            stats.expert_s += max((r.compute_s for r in replies.values()), default=0.0)
            last = max(replies.values(), key=lambda r: r.to_shard_s + r.compute_s + r.from_shard_s, default=None)
            if last is not None:
                stats.to_shard_s += last.to_shard_s
                stats.from_shard_s += last.from_shard_s
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
