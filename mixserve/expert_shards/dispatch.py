"""Sending each MoE layer's tokens to the shards that hold their experts.

Shape legend: T = tokens, D = model dim, K = experts per token, T_s = tokens shard s computes for.

Per layer and step: the attention replica gates (top-k) and picks, for every token's slot, one
shard holding that expert (a replicated expert's tokens are split over its holders, least
loaded first, under the step's placement). Each shard gets, in one message, the rows of the
tokens it has a slot for, their expert ids (-1 for a slot computed elsewhere) and gate weights;
it runs the engine's own MoE kernel on them and sends back one gate-weighted row per token.
The replica adds the shards' rows. The router only publishes placements: data never goes
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
from mixserve.model.moe import MoeLayer


class ShardUnavailableError(MixserveError):
    """A shard failed or timed out; the request is retryable once the shard is back."""


@dataclass
class ShardRequest:
    x: torch.Tensor  # [T_s, D] the tokens with at least one slot on this shard
    expert_ids: torch.Tensor  # [T_s, K] long: global expert ids, -1 where another shard computes the slot
    weights: torch.Tensor  # [T_s, K] gate weights in x's dtype, 0 where expert_ids is -1


@dataclass
class ShardReply:
    output: torch.Tensor  # [T_s, D] per token, the gate-weighted sum over this shard's slots
    compute_s: float  # the shard's own compute time for this request
    to_shard_s: float = 0.0  # request on the wire: sent here -> fully received there
    from_shard_s: float = 0.0  # reply on the wire: sent there -> fully received here


@dataclass
class DispatchStats:
    """Where the time of this replica's remote MoE layers goes, summed over layer calls."""

    calls: int = 0
    route_s: float = 0.0  # pick a shard per slot, gather each shard's token rows
    send_s: float = 0.0  # hand the buffers to the transport
    wait_s: float = 0.0  # blocked until every answer is in (what ping-pong hides)
    expert_s: float = 0.0  # the slowest shard's own compute per call, as the shards report it
    to_shard_s: float = 0.0  # the request's trip to the last shard to answer (wall clocks)
    from_shard_s: float = 0.0  # that shard's reply's trip back
    combine_s: float = 0.0  # add the shards' weighted rows back to their tokens

    def reset(self) -> None:
        self.__init__()


class Transport(Protocol):
    """Moves one layer's groups to shards and back. `submit` returns as soon as the requests
    are on their way (the caller may compute meanwhile: ping-pong micro-batches), `collect`
    waits for the answers. Implementations: in-process (tests, and the baseline for
    measuring), TCP channels (the default, see channel.py) and Ray actor calls; a GPU build
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
            out = self.shards[sid].compute(layer, r.x, r.expert_ids, r.weights)
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
        # Per placement (and device): each expert's first holder, and whether any expert has copies.
        self._table: tuple[Placement | None, torch.Tensor, bool] = (None, torch.empty(0), False)
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

    def route(self, placement: Placement, expert_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The shard that computes each slot of expert_ids [T, K] (a [T, K] tensor), and the
        shards that got any, most slots first. Counts the load (per expert, per shard) as it goes."""
        flat = expert_ids.reshape(-1)  # [T*K]
        counts = torch.bincount(flat, minlength=placement.num_experts).tolist()
        for expert, n in enumerate(counts):
            self.expert_tokens[expert] += n
        if self._table[0] is not placement or self._table[1].device != expert_ids.device:
            first = torch.tensor([h[0] for h in placement.holders], dtype=torch.long, device=expert_ids.device)
            self._table = (placement, first, any(len(h) > 1 for h in placement.holders))
        _, first_holder, has_copies = self._table
        shard_of = first_holder[expert_ids]  # right for every expert with a single holder
        per_shard = [0] * placement.n_shards
        if not has_copies:  # nothing to split or balance
            for expert, n in enumerate(counts):
                per_shard[placement.holders[expert][0]] += n
            return shard_of, self._count_shards(per_shard)
        split: dict[int, list[tuple[int, int]]] = {}
        for expert, shard, rows in self.assign(placement, counts):
            per_shard[shard] += rows
            split.setdefault(expert, []).append((shard, rows))
        flat_shard = shard_of.view(-1)
        for expert, shares in split.items():
            if len(shares) > 1 or shares[0][0] != placement.holders[expert][0]:  # only replicated experts
                slots = (flat == expert).nonzero().squeeze(1)  # in token order
                start = 0
                for shard, rows in shares:
                    flat_shard[slots[start:start + rows]] = shard
                    start += rows
        return shard_of, self._count_shards(per_shard)

    def _count_shards(self, per_shard: list[int]) -> list[int]:
        """Adds a layer call's slots per shard to the load; the shards that got any, busiest
        first (it finishes last, so it should start first)."""
        for shard, n in enumerate(per_shard):
            self.tokens_sent[shard] += n
        return sorted((s for s, n in enumerate(per_shard) if n), key=lambda s: -per_shard[s])


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
        """Sends this layer's tokens to the shards; the returned call waits and combines.
        x [T, D], expert_ids [T, K], weights [T, K] (x's dtype)."""
        began = time.perf_counter()
        client = self.client
        shard_of, shards = client.route(client.step_placement, expert_ids)  # [T, K]: the shard computing each slot
        requests: dict[int, ShardRequest] = {}
        token_rows: dict[int, torch.Tensor] = {}
        for shard in shards:
            held = shard_of == shard  # [T, K]
            elsewhere = ~held
            rows = held.any(dim=1).nonzero().squeeze(1)  # [T_s]
            token_rows[shard] = rows
            requests[shard] = ShardRequest(x=x[rows], expert_ids=expert_ids.masked_fill(elsewhere, -1)[rows],
                                           weights=weights.masked_fill(elsewhere, 0)[rows])

        transport, stats = client.transport, client.stats
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
            # Each token gets its (at most K) slots' weighted rows from one or more shards. With
            # two slots per token, adding them to zero in either order gives the same sum.
            result = torch.zeros_like(x)
            for shard, rows in token_rows.items():
                result.index_add_(0, rows, replies[shard].output.to(x.dtype))
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
