"""The engine behind asyncio: one thread steps the engine, callers await their own outputs.

Why a thread and not the event loop: a step is a blocking burst of matmuls (milliseconds to
a second); running it on the loop would stall every HTTP connection of the replica. The
engine itself stays single-threaded: only the step thread and calls holding `_lock` touch it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from mixserve.errors import MixserveError
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput

log = logging.getLogger(__name__)


class EngineStepError(MixserveError):
    """A step failed (an expert shard died, say): every request in flight ends with this.
    Retryable: a new request runs on the recovered topology."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
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
        """Yields the request's outputs as steps produce them. Invalid input raises before
        anything is queued; leaving the iteration early (client gone) aborts the request."""
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params, chat=chat, tenant=tenant, weight=weight)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._work.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
                self.engine.abort(request_id)  # no-op when it finished; frees the slot when it did not

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": self.engine.num_running,
                "waiting": self.engine.num_waiting,
                "free_slots": self.engine.scheduler.slots.n_free,
                "slots": self.engine.scheduler.slots.n_slots,
            }

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)

    # ---- the step thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            self._work.wait()
            with self._lock:
                if not self.engine.has_unfinished():
                    self._work.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - any failure ends the requests, never the thread
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(EngineStepError(f"generation failed and can be retried: {exc}"))
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._queues):
            self.engine.abort(request_id)
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)
