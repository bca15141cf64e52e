"""Where the front door starts a generation: on the attention replicas through their Serve
handle, or on the attention replica that runs in the front door's own process.

Both give a stream of RequestOutput | Progress | GenerateError with `cancel()`, the interface of
a Serve streaming response, so FrontDoor treats them alike.

Why the in-process form: on the separate path every output crosses a process twice (replica
-> ingress -> HTTP proxy), and each Ray streaming message costs about a millisecond of CPU
across the processes involved; measured on the 2-core CI machine at 16 concurrent streams the
ingress alone burned 1.2 ms of CPU per streamed chunk. With the front door inside the replica,
an output goes from the engine thread to the response in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from mixserve.platform.detached import spawn_detached
from mixserve.platform.front_door import ApiError
from mixserve.replicas.deployment import AttentionReplica, GenerateError, GenerateRequest, Progress
from mixserve.replicas.sequence import RequestOutput


class GenerationStream(Protocol):
    def __aiter__(self) -> AsyncIterator[RequestOutput | Progress | GenerateError]: ...

    def cancel(self) -> None: ...


def on_replicas(replica_handle) -> Callable[[GenerateRequest], GenerationStream]:
    """Generations on the attention replicas' deployment (Serve picks the replica)."""
    return lambda request: replica_handle.options(stream=True).generate.remote(request)


class InProcessReplica:
    """The attention replica in this process, bounded the way Serve bounds a replica: at most
    `capacity` generations at once (its running plus its queued requests); past that a request
    gets 503 with Retry-After instead of an unbounded queue."""

    def __init__(self, replica: AttentionReplica, capacity: int):
        self.replica = replica
        self.capacity = capacity
        self.in_flight = 0

    def open(self, request: GenerateRequest) -> LocalStream:
        if self.in_flight >= self.capacity:
            raise ApiError(503, "the model is overloaded; retry shortly")
        self.in_flight += 1
        return LocalStream(self.replica.generate(request), self._ended)

    def _ended(self) -> None:
        self.in_flight -= 1


class LocalStream:
    """An in-process generation with a Serve response's `cancel()`. `on_end` runs exactly once,
    when the generation ends or is cancelled, whichever comes first."""

    def __init__(self, outputs: AsyncIterator, on_end: Callable[[], None]):
        self._outputs, self._on_end, self._ended = outputs, on_end, False

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> RequestOutput | Progress | GenerateError:
        try:
            return await self._outputs.__anext__()
        except BaseException:  # the end, an error or the caller's cancellation: the generation is over
            self._end()
            raise

    def cancel(self) -> None:
        """Closes the generation, which aborts its request and frees its cache slot. One being
        iterated right now is closed by cancelling its consumer instead (Choices does both)."""
        self._end()
        spawn_detached(_close_quietly(self._outputs))

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_end()


async def _close_quietly(outputs) -> None:
    try:
        await outputs.aclose()
    except RuntimeError:  # still being iterated: its consumer's cancellation closes it
        pass
