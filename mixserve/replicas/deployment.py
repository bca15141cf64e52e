"""The attention replica as a Ray Serve deployment body.

It holds the non-expert weights and the rolling KV caches and runs continuous batching. Where
the experts live is injected: `await experts_connector(router)` returns the model's feed-forward
factory (remote shards); None keeps the experts in-process. The platform wires that in,
so this module never imports the expert side. Likewise `stats_reporter(stats_target, stats)`
is how the queue figures reach the platform's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import torch

from mixserve.errors import ContextLengthError, InvalidRequestError, MixserveError
from mixserve.model import ModelArgs, WeightsSource, as_weights_source, load_model
from mixserve.replicas.async_engine import AsyncEngine
from mixserve.model.factory import DTYPES
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.engine_process import ProcessEngine
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput
from mixserve.replicas.tokenizer import Tokenizer

log = logging.getLogger(__name__)
STATS_EVERY_S = 0.5
# A non-streamed generation's token count goes out this often (see Progress).
PROGRESS_EVERY_S = 1.0
GIL_SWITCH_S = 0.0005


@dataclass
class GenerateRequest:
    """What the ingress sends a replica (typed, pickled across processes)."""

    prompt: str | list[int]
    params: SamplingParams
    chat: bool = False
    request_id: str | None = None
    tenant: str = ""  # for weighted fair scheduling across tenants
    weight: float = 1.0
    stream: bool = True  # False: send the first and the final output, and a Progress each PROGRESS_EVERY_S


@dataclass
class Progress:
    """How many tokens a non-streamed generation has made so far. Its outputs between the first
    and the last are not sent (a message per token per request saved), so without this a client
    that leaves before the end would be charged only the first output's tokens."""

    completion_tokens: int


@dataclass
class GenerateError:
    """A request's failure, sent as a message so that its type survives the hop."""

    kind: str  # "invalid_request" | "context_length" | "unavailable"
    message: str
    param: str | None = None


class AttentionReplica:
    async def __init__(  # Serve awaits async constructors; the experts connector is async
        self,
        checkpoint: str | WeightsSource,
        model_name: str,
        engine_config: dict,
        expert_router=None,
        experts_connector: Callable[..., Awaitable[Callable]] | None = None,
        stats_target=None,
        stats_reporter: Callable[..., Awaitable[None]] | None = None,
    ):
        # Wall-clock marks of this replica's start (a cold start's breakdown: experts, weights, ready).
        self._startup = {"started_at": time.time()}
        config = EngineConfig.model_validate(engine_config)
        # A remote source fetches only the tensors this replica holds (no expert's, with shards).
        self._weights = as_weights_source(checkpoint)
        self.model_name = model_name
        if config.step_loop == "process" and experts_connector is not None:
            raise ValueError("step_loop 'process' needs in-process experts (shards: 0); remote experts step in a thread")
        if config.step_loop == "process" or (config.step_loop == "auto" and experts_connector is None):
            self._startup["experts_ready_at"] = time.time()
            self.engine = await asyncio.to_thread(ProcessEngine, self._weights, config)
            self._weights_report = self.engine.weights_report  # the child read the weights
            self._startup["weights_loaded_at"] = time.time()
        else:
            self.engine = await self._engine_in_thread(config, expert_router, experts_connector)
            self._weights_report = None
        self._startup["ready_at"] = time.time()
        if stats_reporter is not None:
            # Queue figures for /metrics; injected so this package needs nothing of the platform's.
            asyncio.get_running_loop().create_task(self._report_stats(stats_reporter, stats_target))

    async def _engine_in_thread(self, config: EngineConfig, expert_router, experts_connector) -> AsyncEngine:
        # The step thread holds the GIL for most of each step; with the default 5 ms switch
        # interval every request arriving and every output leaving waits behind it (convoy).
        sys.setswitchinterval(GIL_SWITCH_S)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        args = ModelArgs.from_folder(await asyncio.to_thread(self._weights.folder))
        max_len = config.max_model_len or args.max_position_embeddings
        kwargs = {}
        if experts_connector is not None:
            kwargs["feed_forward_factory"] = await experts_connector(expert_router)
        self._startup["experts_ready_at"] = time.time()
        model = await asyncio.to_thread(
            load_model, self._weights, max_positions=max_len, dtype=DTYPES[config.dtype], device=config.device,
            moe_kernel=config.moe_kernel, **kwargs
        )
        self._startup["weights_loaded_at"] = time.time()
        return AsyncEngine(LLMEngine(model, Tokenizer.from_checkpoint(self._weights.folder()), config))

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine process exited is replaced."""
        if not self.engine.alive:
            raise RuntimeError("the engine process has exited")

    @classmethod
    async def start(cls, *args, **kwargs) -> AttentionReplica:
        """An attention replica inside another deployment's process (the front door's, when it
        runs in the replicas). Serve awaits the async constructor itself; elsewhere this does."""
        replica = cls.__new__(cls)
        await replica.__init__(*args, **kwargs)
        return replica

    async def _report_stats(self, reporter, target) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            try:
                await reporter(target, self.engine.stats())
            except Exception:  # noqa: BLE001 - a missed report only delays the figures
                log.warning("could not report queue figures", exc_info=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput | Progress | GenerateError]:
        try:
            outputs = self.engine.generate(
                request.prompt, request.params, request.chat, request.request_id, request.tenant, request.weight
            )
            first, reported_at = True, time.monotonic()
            async for out in outputs:
                # A client that does not stream needs the first output (it proves admission)
                # and the last; skipping the rest saves a message per token per request. Its
                # token count still goes out about once a second, for its charge.
                if request.stream or first or out.finished:
                    yield out
                elif (now := time.monotonic()) - reported_at >= PROGRESS_EVERY_S:
                    reported_at = now
                    yield Progress(len(out.token_ids))
                first = False
        except ContextLengthError as exc:
            yield GenerateError("context_length", exc.message, exc.param)
        except InvalidRequestError as exc:
            yield GenerateError("invalid_request", exc.message, exc.param)
        except MixserveError as exc:
            yield GenerateError("unavailable", str(exc))

    def stats(self) -> dict:
        return {"model": self.model_name, **self.engine.stats()}

    def startup_report(self) -> dict:
        """When this replica started, connected its experts, loaded its weights and became ready
        (wall-clock seconds), with what fetching the weights cost."""
        return {**self._startup, "weights": self.weights_report()}

    def weights_report(self) -> dict:
        """What loading the weights cost this replica (bytes fetched, from where)."""
        return self._weights_report if self._weights_report is not None else self._weights.report()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
