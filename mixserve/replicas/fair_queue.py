"""Weighted fair queuing across tenants, where requests wait: in the attention replica.

Each tenant has a virtual time = tokens scheduled for it / its weight. The scheduler admits
the oldest waiting request of the tenant with the smallest virtual time, and gives prompt
chunks to running prefills in the same order, so a tenant that floods the replica advances
its own clock and waits behind the others, never in front of them. A tenant that has been
idle re-enters at the current minimum virtual time: idleness banks no credit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from mixserve.replicas.sequence import Sequence


class FairQueue:
    def __init__(self) -> None:
        self._queues: dict[str, deque[Sequence]] = {}
        self._virtual: dict[str, float] = {}  # tenant -> tokens scheduled / weight

    # ---- the waiting requests ----------------------------------------------------------------
    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queues seq last in its tenant's line (first when it was preempted: it goes back in
        before its tenant's newer requests)."""
        tenant = seq.tenant
        if tenant not in self._queues:
            self._queues[tenant] = deque()
            floor = min(self._virtual.values(), default=0.0)
            self._virtual[tenant] = max(self._virtual.get(tenant, 0.0), floor)
        if front:
            self._queues[tenant].appendleft(seq)
        else:
            self._queues[tenant].append(seq)

    def remove(self, seq: Sequence) -> None:
        queue = self._queues[seq.tenant]
        queue.remove(seq)
        if not queue:
            del self._queues[seq.tenant]

    def pop_next(self) -> Sequence:
        """The oldest request of the tenant furthest behind its fair share; on a tie, of the
        tenant with fewer requests waiting (a newcomer goes before a backlog)."""
        tenant = min(self._queues, key=lambda t: (self._virtual[t], len(self._queues[t]), self._queues[t][0].arrival))
        queue = self._queues[tenant]
        seq = queue.popleft()
        if not queue:
            del self._queues[tenant]
        return seq

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __iter__(self) -> Iterator[Sequence]:
        for queue in self._queues.values():
            yield from queue

    # ---- service accounting ------------------------------------------------------------------
    def charge(self, seq: Sequence, tokens: int) -> None:
        self._virtual[seq.tenant] = self._virtual.get(seq.tenant, 0.0) + tokens / seq.weight

    def virtual_time(self, seq: Sequence) -> float:
        return self._virtual.get(seq.tenant, 0.0)

    def forget_idle(self, active: set[str]) -> None:
        """Drops the clocks of tenants with nothing waiting or running (bounded memory)."""
        for tenant in [t for t in self._virtual if t not in active and t not in self._queues]:
            del self._virtual[tenant]
