"""The loop that owns an engine and steps it: commands in, outputs out.

It runs in a thread beside the event loop (AsyncEngine) or alone in a child process
(ProcessEngine); both feed it the same commands and receive the same deliveries, so the
semantics of adding, aborting, failing and widening are written once, here.

Commands: ("add", request_id, prompt, params, chat, tenant, weight, more_coming) and
("abort", request_id); more_coming is how many requests the front door held, not yet handed over,
when this one was sent (see `gather`).
Deliveries: a step's outputs, or one request's error (an invalid request's first and only item).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from mixserve.errors import MixserveError
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.sequence import RequestOutput

log = logging.getLogger(__name__)


class EngineStepError(MixserveError):
    """A step failed (an expert shard died, say): every request in flight ends with this.
    Retryable: a new request runs on the recovered topology."""


class Outbox(Protocol):
    def outputs(self, outputs: list[RequestOutput], stats: dict[str, int]) -> None: ...

    def error(self, request_id: str, error: Exception) -> None: ...

    def stats(self, stats: dict[str, int]) -> None: ...


class StepLoop:
    def __init__(self, engine: LLMEngine, outbox: Outbox):
        self.engine = engine
        self.outbox = outbox
        # Requests added that have produced nothing yet. While any has, the engine's heavy ops
        # stay on the step's own thread count (EngineConfig.heavy_op_threads), so that the event
        # loop sharing the cores parses, admits and answers arrivals at once. On the 2-core CI
        # machine, widening them regardless lifted 16-stream throughput to 1.16-1.23x vLLM's but
        # left p99 time to first token at 1.04-1.70x (0.78-0.83x before).
        self.no_output_yet: set[str] = set()
        self.arrival_wait_s = engine.config.arrival_wait_ms / 1e3
        self.more_coming = 0  # what the latest request said of the ones behind it

    def run(self, next_commands: Callable[[float | None], list[tuple] | None]) -> None:
        """Steps until `next_commands` returns None. It is called with the longest it may wait
        for a command: 0 between steps (whatever has arrived), None when nothing runs (until
        something arrives), or a deadline's remainder while gathering a burst."""
        while True:
            idle = not self.engine.has_unfinished()
            commands = next_commands(None if idle else 0)
            if commands is None:
                return
            self.more_coming = 0
            for command in commands:
                self.apply(command)
            if idle and self.more_coming and not self.gather(next_commands):
                return
            if not self.engine.has_unfinished():
                self.outbox.stats(self.read_stats())
                continue
            self.step()

    def gather(self, next_commands: Callable[[float | None], list[tuple] | None]) -> bool:
        """An engine that was idle when requests reached it waits, at most arrival_wait_s, while
        the latest one says the front door holds more: they then share the first prefill step.
        Why: in a burst the first request otherwise prefills alone, and every other waits for
        that step before its own (2-core CI machine, 16 streams arriving within ~20 ms: the lone
        step took 20-40 ms beside the front door parsing the rest). Measured there, tiny-mixtral
        served to 16 clients in bursts, 4 rounds each: time to first token p50 97-119 ms and p99
        131-179 ms waiting up to 20 ms, against 136-155 and 234-239 without. A lone request, or
        one whose front door knows of no other, waits nothing. False when the commands ended."""
        deadline = time.monotonic() + self.arrival_wait_s
        while self.more_coming and (left := deadline - time.monotonic()) > 0:
            commands = next_commands(left)
            if commands is None:
                return False
            if commands:
                self.more_coming = 0
            for command in commands:
                self.apply(command)
        return True

    def apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort(command[1])
            self.no_output_yet.discard(command[1])
            return
        _, request_id, prompt, params, chat, tenant, weight, self.more_coming = command
        try:
            self.engine.add_request(request_id, prompt, params, chat=chat, tenant=tenant, weight=weight)
        except Exception as exc:  # noqa: BLE001 - InvalidRequestError and kin: the caller's to raise
            self.outbox.error(request_id, exc)
            return
        self.no_output_yet.add(request_id)

    def step(self) -> None:
        self.engine.widen_heavy_ops = not self.no_output_yet
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - any failure ends the requests, never the loop
            log.exception("engine step failed; failing the requests in flight")
            self.fail_all(EngineStepError(f"generation failed and can be retried: {exc}"))
            return
        if self.no_output_yet:  # empty on most decode steps: nothing to scan
            for out in outputs:
                self.no_output_yet.discard(out.request_id)
        self.outbox.outputs(outputs, self.read_stats())

    def fail_all(self, error: Exception) -> None:
        for request_id in self.engine.request_ids():
            self.engine.abort(request_id)
            self.no_output_yet.discard(request_id)
            self.outbox.error(request_id, error)
        self.outbox.stats(self.read_stats())

    def read_stats(self) -> dict[str, int]:
        engine = self.engine
        return {
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "free_slots": engine.scheduler.slots.n_free,
            "slots": engine.scheduler.slots.n_slots,
        }
