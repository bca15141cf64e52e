"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step: all decoding sequences get one token each (decode latency first), then
prefilling sequences get prompt chunks of at most `chunk_size` tokens from what is left of
the step's token budget, then waiting requests are admitted while cache slots and budget
remain. Requests join and leave the batch at any step; a full slot pool makes admission
wait, never allocate. Across tenants, admission and prompt chunks follow weighted fair
queuing (fair_queue.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixserve.replicas.fair_queue import FairQueue
from mixserve.replicas.sequence import Sequence, Status


class SlotPool:
    """Fixed set of cache slot numbers handed to running sequences."""

    def __init__(self, n_slots: int):
        self._free = list(range(n_slots - 1, -1, -1))
        self.n_slots = n_slots

    @property
    def n_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)


@dataclass
class ScheduledChunk:
    seq: Sequence
    length: int

    @property
    def completes_prompt(self) -> bool:
        """After this chunk the sequence has computed its whole input and samples a token."""
        return self.seq.num_computed + self.length >= self.seq.prefill_until


class Scheduler:
    def __init__(self, n_slots: int, token_budget: int, chunk_size: int):
        self.slots = SlotPool(n_slots)
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.waiting = FairQueue()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.add(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """The next step's chunks, single-token chunks first (they share the batched decode path)."""
        fair = self.waiting
        fair.forget_idle({seq.tenant for seq in self.running})
        self._preempt_over_share()
        decodes = [ScheduledChunk(seq, 1) for seq in self.running if not seq.in_prefill]
        budget = self.token_budget - len(decodes)  # the budget is >= n_slots, so decodes always fit
        prefills: list[ScheduledChunk] = []
        for seq in sorted((s for s in self.running if s.in_prefill), key=fair.virtual_time):
            if budget > 0:
                length = min(self.chunk_size, seq.prefill_until - seq.num_computed, budget)
                (decodes if length == 1 else prefills).append(ScheduledChunk(seq, length))
                budget -= length
        while self.waiting and self.slots.n_free and budget > 0:
            seq = self.waiting.pop_next()
            seq.slot = self.slots.take()
            seq.status = Status.RUNNING
            self.running.append(seq)
            length = min(self.chunk_size, seq.prefill_until, budget)
            (decodes if length == 1 else prefills).append(ScheduledChunk(seq, length))
            budget -= length
        chunks = decodes + prefills
        for chunk in chunks:
            fair.charge(chunk.seq, chunk.length)
        return chunks

    def _preempt_over_share(self) -> None:
        """Work-conserving fairness for cache slots: a tenant may hold more than its weighted
        share of the slots while nobody else waits; when a tenant below its share waits and no
        slot is free, the over-share tenant's newest sequence is preempted (recomputed later).
        Both sides keep a margin (the taker stays within its share, the giver at or above it),
        so two tenants never take a slot back and forth."""
        while self.waiting and not self.slots.n_free:
            running: dict[str, list[Sequence]] = {}
            weights: dict[str, float] = {}
            for seq in [*self.running, *self.waiting]:
                weights[seq.tenant] = seq.weight
            for seq in self.running:
                running.setdefault(seq.tenant, []).append(seq)
            total = sum(weights.values())
            share = {t: self.slots.n_slots * w / total for t, w in weights.items()}
            takers = [t for t in {s.tenant for s in self.waiting} if len(running.get(t, [])) + 1 <= share[t]]
            givers = [t for t, seqs in running.items() if len(seqs) - 1 >= share[t] and t not in takers]
            if not takers or not givers:
                return
            giver = max(givers, key=lambda t: len(running[t]) / share[t])
            victim = max(running[giver], key=lambda s: s.arrival)  # the newest: least work lost
            self._release_slot(victim)
            victim.status = Status.WAITING
            victim.preempt()
            self.waiting.add(victim, front=True)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence and frees its slot at once (finish, stop, abort alike)."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self._release_slot(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason


    def _release_slot(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.slots.give_back(seq.slot)
        seq.slot = None


def split_micro_batches(chunks: list[ScheduledChunk], parts: int) -> list[list[ScheduledChunk]]:
    """Splits a step's chunks into up to `parts` micro-batches of near-equal token counts
    (largest chunks placed first, each into the lightest part). Within a part decodes stay
    first, in schedule order, as the step metadata requires. Empty parts are dropped."""
    if parts <= 1 or len(chunks) < 2:
        return [chunks]
    groups: list[list[int]] = [[] for _ in range(min(parts, len(chunks)))]
    tokens = [0] * len(groups)
    for i in sorted(range(len(chunks)), key=lambda i: -chunks[i].length):
        lightest = tokens.index(min(tokens))
        groups[lightest].append(i)
        tokens[lightest] += chunks[i].length
    return [[chunks[i] for i in sorted(g, key=lambda i: (chunks[i].length != 1, i))] for g in groups if g]
