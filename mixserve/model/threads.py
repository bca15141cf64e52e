"""Intra-op threads for the few heavy ops of a step (the LM head and the feed-forward).

Why: a replica that shares its cores with its event loop decodes on one thread (EngineConfig
num_threads), since the event loop preempting an OpenMP worker stalls the barrier of every one
of a step's hundred small ops. The LM head and the experts, though, stream most of a decode
step's weight bytes in a few large parallel regions: a second thread nearly halves them, and an
occasional stall costs little beside that. Measured on the 2-core EPYC CI machine, one server
with 16 streaming clients on tiny-mixtral, rounds alternating between the two settings: 860 to
911 output tokens/s decoding on one thread throughout, 861 to 1049 with these ops on two; in the
serving benchmark, 1.16 to 1.23x vLLM's output tokens/s against 0.93 to 0.96x before. (The
replica's front end keeps them narrow while a caller waits for its first token: see
mixserve/replicas/async_engine.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

_UNCHANGED = nullcontext()  # reusable: it holds no state


def intra_op_threads(n: int | None) -> AbstractContextManager[None]:
    """Runs the block on n torch intra-op threads, then restores the calling thread's count
    (None, or the count already set: nothing changes). Entered several times in every layer of
    every step, so the usual no-change case costs no generator."""
    if not n:
        return _UNCHANGED
    current = torch.get_num_threads()
    return _UNCHANGED if n == current else _switched(n, current)


@contextmanager
def _switched(n: int, current: int) -> Iterator[None]:
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(current)
