"""The engine behind asyncio: a step loop owns and steps the engine, callers await their outputs.

Why the steps run off the event loop: a step is a blocking burst of matmuls (milliseconds to
a second); running it on the loop would stall every connection of the replica. Why an inbox
and no lock: the loop must never wait for a step to end either. Callers post "add" and
"abort" commands; the step loop (step_loop.py) applies them between steps (validation errors
come back as the caller's first item) and delivers outputs, one wake-up per event loop per step.

Where the step loop runs is the subclass's choice: AsyncEngine in a thread of this process,
ProcessEngine (engine_process.py) in a child process of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable

from mixserve.errors import InvalidRequestError
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput
from mixserve.replicas.step_loop import EngineStepError, StepLoop

__all__ = ["AsyncEngine", "EngineFront", "EngineStepError", "merge_outputs"]


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of the same request."""
    return dataclasses.replace(
        later,
        new_text=earlier.new_text + later.new_text,
        new_token_ids=earlier.new_token_ids + later.new_token_ids,
        time_to_first_token_s=earlier.time_to_first_token_s if earlier.time_to_first_token_s is not None
        else later.time_to_first_token_s,
    )


class EngineFront:
    """The callers' side: request queues on their event loops, and deliveries into them.
    Subclasses post commands to wherever their step loop runs."""

    alive = True  # False once the step loop is gone for good (ProcessEngine: its child exited)
    # How many requests the front door in this process holds that have not reached this engine
    # yet (set by the platform; None: no such front door). Sent with each request, it lets an
    # idle engine wait for a burst's next arrivals (EngineConfig.arrival_wait_ms).
    arrivals: Callable[[], int] | None = None

    def __init__(self) -> None:
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stats: dict[str, int] = {}

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        chat: bool = False,
        request_id: str | None = None,
        tenant: str = "",
        weight: float = 1.0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as steps produce them. Invalid input raises before any
        output; leaving the iteration early (client gone) aborts the request."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        outputs: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), outputs)
        more_coming = self.arrivals() if self.arrivals is not None else 0
        self._post(("add", request_id, prompt, params, chat, tenant, weight, more_coming))
        held = None  # an item read while coalescing, served next
        try:
            while True:
                item = held if held is not None else await outputs.get()
                held = None
                # A consumer slower than the steps finds several outputs waiting: send them as one
                # (deltas joined), so a loaded replica sends fewer, larger messages, not a backlog.
                while not isinstance(item, Exception) and not item.finished and not outputs.empty():
                    following = outputs.get_nowait()
                    if isinstance(following, Exception):
                        held = following
                        break
                    item = merge_outputs(item, following)
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            self._post(("abort", request_id))  # no-op when it finished; frees the slot when it did not

    def stats(self) -> dict[str, int]:
        """Queue figures as of the last step (read without waiting for the step loop)."""
        return dict(self._stats)

    def shutdown(self) -> None:
        raise NotImplementedError

    def _post(self, command: tuple) -> None:
        raise NotImplementedError

    # ---- deliveries (from whichever thread receives the step loop's results) -----------------
    def _deliver_outputs(self, outputs: list[RequestOutput], stats: dict[str, int]) -> None:
        """A step's outputs, one wake-up per event loop: call_soon_threadsafe writes the loop's
        self-pipe each time, and at 16 streams one call per output was 16 wake-ups a step."""
        self._stats = stats
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._queues.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _deliver_error(self, request_id: str, error: Exception) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            _call_soon(target[0], target[1].put_nowait, error)

    def _deliver_stats(self, stats: dict[str, int]) -> None:
        self._stats = stats

    def _fail_callers(self, error: Exception) -> None:
        """Every caller still waiting gets `error` (the step loop is gone)."""
        for request_id in list(self._queues):
            self._deliver_error(request_id, error)


class _ThreadOutbox:
    def __init__(self, front: EngineFront):
        self.outputs, self.error, self.stats = front._deliver_outputs, front._deliver_error, front._deliver_stats


class AsyncEngine(EngineFront):
    """The step loop in a thread of this process (the engine is this process's)."""

    def __init__(self, engine: LLMEngine):
        super().__init__()
        self.engine = engine
        self.loop = StepLoop(engine, _ThreadOutbox(self))
        self._stats = self.loop.read_stats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._work = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self.loop.run, args=(self._next_commands,), name="engine-steps", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)

    def _post(self, command: tuple) -> None:
        self._inbox.put(command)
        self._work.set()

    def _next_commands(self, wait_s: float | None) -> list[tuple] | None:
        if wait_s is None:
            self._work.wait()
        elif wait_s > 0:
            self._work.wait(wait_s)
        self._work.clear()  # cleared before draining: a command posted meanwhile sets it again
        if self._stopped:
            return None
        commands = []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the caller's loop closed: nobody is waiting for this any more
        pass


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)
