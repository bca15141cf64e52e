"""The engine behind asyncio: one thread owns and steps the engine, callers await their outputs.

Why a thread and not the event loop: a step is a blocking burst of matmuls (milliseconds to
a second); running it on the loop would stall every connection of the replica. Why an inbox
and no lock: the loop must never wait for a step to end either. Callers post "add" and
"abort" commands; the step thread applies them between steps (validation errors go back to
the caller as its first item) and delivers outputs with call_soon_threadsafe. Only the step
thread ever touches the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator

from mixserve.errors import InvalidRequestError, MixserveError
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput

log = logging.getLogger(__name__)


class EngineStepError(MixserveError):
    """A step failed (an expert shard died, say): every request in flight ends with this.
    Retryable: a new request runs on the recovered topology."""


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of the same request."""
    return dataclasses.replace(
        later,
        new_text=earlier.new_text + later.new_text,
        new_token_ids=earlier.new_token_ids + later.new_token_ids,
        time_to_first_token_s=earlier.time_to_first_token_s if earlier.time_to_first_token_s is not None
        else later.time_to_first_token_s,
    )


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._stats = self._read_stats()
        # Requests whose caller still waits for a first output. Why: while any does, the engine's
        # heavy ops stay on the step's own thread count (EngineConfig.heavy_op_threads), so that
        # the event loop sharing the cores parses, admits and answers arrivals at once. On the
        # 2-core CI machine, widening them regardless lifted 16-stream throughput to 1.16-1.23x
        # vLLM's but left p99 time to first token at 1.04-1.70x (0.78-0.83x before); with this
        # rule, one run gave 1.23x and 1.23x (p99 there is the second-worst of 128 and swings).
        self._awaiting_first = 0
        self._awaiting_lock = threading.Lock()  # generate() may run on more than one event loop
        self._thread = threading.Thread(target=self._run, name="engine-steps", daemon=True)
        self._thread.start()

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
        self._count_awaiting(+1)
        waiting_first = True
        self._post(("add", request_id, prompt, params, chat, tenant, weight))
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
                if waiting_first:
                    waiting_first = False
                    self._count_awaiting(-1)
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if waiting_first:
                self._count_awaiting(-1)
            self._queues.pop(request_id, None)
            self._post(("abort", request_id))  # no-op when it finished; frees the slot when it did not

    def stats(self) -> dict[str, int]:
        """Queue figures as of the last step (read without waiting for the step thread)."""
        return dict(self._stats)

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)

    def _count_awaiting(self, change: int) -> None:
        with self._awaiting_lock:
            self._awaiting_first += change

    def _post(self, command: tuple) -> None:
        self._inbox.put(command)
        self._work.set()

    # ---- the step thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            self._work.wait()
            self._work.clear()  # cleared before draining: a command posted meanwhile sets it again
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._stats = self._read_stats()
                continue
            self._work.set()  # keep stepping while anything runs
            self.engine.widen_heavy_ops = self._awaiting_first == 0
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - any failure ends the requests, never the thread
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(EngineStepError(f"generation failed and can be retried: {exc}"))
                continue
            finally:
                self._stats = self._read_stats()
            self._deliver_step(outputs)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self.engine.abort(command[1])
                continue
            _, request_id, prompt, params, chat, tenant, weight = command
            if request_id not in self._queues:  # the caller left before its request got in
                continue
            try:
                self.engine.add_request(request_id, prompt, params, chat=chat, tenant=tenant, weight=weight)
            except Exception as exc:  # noqa: BLE001 - InvalidRequestError and kin: the caller's to raise
                self._deliver(request_id, exc)

    def _read_stats(self) -> dict[str, int]:
        engine = self.engine
        return {
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "free_slots": engine.scheduler.slots.n_free,
            "slots": engine.scheduler.slots.n_slots,
        }

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._queues):
            self.engine.abort(request_id)
            self._deliver(request_id, error)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, one wake-up per event loop: call_soon_threadsafe writes the loop's
        self-pipe each time, and at 16 streams one call per output was 16 wake-ups a step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._queues.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)
