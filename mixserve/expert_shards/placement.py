"""Which expert shards hold which experts, and how balanced a load is under a placement.

A `Placement` is immutable and versioned: the router builds a new one (say, with the hottest
expert replicated into a shard's spare capacity) and publishes it whole, so a step in flight
keeps the table it started with and the next step sees the new one. Nothing is edited in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def max_over_mean(loads: Sequence[float]) -> float:
    """The balance figure: max / mean load, 1.0 when even (and when there is no load at all)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean else 1.0


class PlacementError(ValueError):
    """A placement request that cannot be satisfied (no capacity, unknown expert or shard)."""


@dataclass(frozen=True)
class Placement:
    version: int
    n_shards: int
    capacity: int  # most experts one shard may hold
    holders: tuple[tuple[int, ...], ...]  # expert -> shards holding it, in ascending order

    @property
    def num_experts(self) -> int:
        return len(self.holders)

    @classmethod
    def contiguous(cls, num_experts: int, n_shards: int, capacity: int | None = None) -> Placement:
        """Experts split into n_shards contiguous, near-equal runs (0,1 | 2,3 | ...)."""
        if n_shards < 1 or num_experts < 1:
            raise PlacementError("a placement needs at least one expert and one shard")
        if n_shards > num_experts:
            raise PlacementError(f"{n_shards} shards for {num_experts} experts: some shard would hold none")
        per_shard = -(-num_experts // n_shards)
        capacity = capacity if capacity is not None else per_shard
        if capacity < per_shard:
            raise PlacementError(f"capacity {capacity} per shard cannot hold {num_experts} experts on {n_shards} shards")
        base, extra = divmod(num_experts, n_shards)
        holders: list[tuple[int, ...]] = []
        for shard in range(n_shards):
            holders.extend((shard,) for _ in range(base + (shard < extra)))
        return cls(version=0, n_shards=n_shards, capacity=capacity, holders=tuple(holders))

    def experts_of(self, shard: int) -> list[int]:
        return [e for e, shards in enumerate(self.holders) if shard in shards]

    def spare(self, shard: int) -> int:
        return self.capacity - len(self.experts_of(shard))

    def with_replica(self, expert: int, shard: int) -> Placement:
        if not 0 <= expert < self.num_experts or not 0 <= shard < self.n_shards:
            raise PlacementError(f"no expert {expert} or shard {shard} in this placement")
        if shard in self.holders[expert]:
            raise PlacementError(f"shard {shard} already holds expert {expert}")
        if self.spare(shard) < 1:
            raise PlacementError(f"shard {shard} has no spare capacity")
        holders = list(self.holders)
        holders[expert] = tuple(sorted((*holders[expert], shard)))
        return Placement(self.version + 1, self.n_shards, self.capacity, tuple(holders))

    def shard_loads(self, expert_tokens: Sequence[float]) -> list[float]:
        """Tokens per shard when each expert's tokens are split evenly over its holders (what
        least-loaded dispatch approaches)."""
        loads = [0.0] * self.n_shards
        for expert, tokens in enumerate(expert_tokens):
            share = tokens / len(self.holders[expert])
            for shard in self.holders[expert]:
                loads[shard] += share
        return loads

    def balance(self, expert_tokens: Sequence[float]) -> float:
        """max / mean tokens per shard under this placement."""
        return max_over_mean(self.shard_loads(expert_tokens))

    def replicate_hottest(self, expert_tokens: Sequence[float], count: int = 1) -> Placement:
        """Copies the hottest experts (by tokens per holder) into the least-loaded shards
        with spare capacity, one at a time; stops early when no copy lowers the balance."""
        placement = self
        for _ in range(count):
            best: Placement | None = None
            per_holder = [t / len(placement.holders[e]) for e, t in enumerate(expert_tokens)]
            loads = placement.shard_loads(expert_tokens)
            for expert in sorted(range(placement.num_experts), key=lambda e: -per_holder[e]):
                targets = [s for s in range(placement.n_shards) if s not in placement.holders[expert] and placement.spare(s) > 0]
                if targets:
                    best = placement.with_replica(expert, min(targets, key=lambda s: loads[s]))
                    break
            if best is None or best.balance(expert_tokens) >= placement.balance(expert_tokens):
                break
            placement = best
        return placement
