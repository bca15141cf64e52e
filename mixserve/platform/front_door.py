"""What every front door does before and after generation, whatever its protocol.

HTTP and gRPC ingresses both: authenticate the caller (API key -> tenant), check the model,
tokenize off the event loop, admit the request against the tenant's quotas (the shared
ledger), open the choices on the attention replicas, and settle usage and metrics at the end,
whether the request finished, failed or its client left. Errors are ApiError with an HTTP
status; the gRPC ingress maps the same statuses to gRPC codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ray.serve.exceptions import BackPressureError

from mixserve.errors import ContextLengthError, InvalidRequestError, MixserveError
from mixserve.model.args import ModelArgs
from mixserve.model.weights_source import WeightsSource, checkpoint_folder
from mixserve.platform.detached import spawn_detached
from mixserve.platform.metering import MeterBatch
from mixserve.platform.openai_api import TokenText
from mixserve.platform.tenants import KeyRing, Tenant, resolve_system_prompt
from mixserve.replicas.async_engine import merge_outputs
from mixserve.replicas.deployment import GenerateError, GenerateRequest, Progress
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput
from mixserve.replicas.tokenizer import Tokenizer

log = logging.getLogger(__name__)
ANONYMOUS = "anonymous"  # the tenant name of callers of an open deployment (no tenants configured)
RETRY_AFTER_S = 1
COLD_RETRY_AFTER_S = 10  # a model group that did not start in time needs more than a second
# How often a front door tells the ledger which of its leases still run (well under the ledger's
# lease_s, 900 s): a generation may run longer than a lease, and must keep its slot and be charged.
RENEW_LEASES_EVERY_S = 60.0
# What a chat turn without max_tokens reserves of its tenant's tokens/min, per choice (see start):
# OpenAI's completions default.
OPEN_ENDED_RESERVE_TOKENS = 16
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
}


class ApiError(MixserveError):
    """A request refused or failed, with the HTTP status that says why."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s if retry_after_s is not None else (RETRY_AFTER_S if status in (429, 503) else None)

    def __reduce__(self):  # crosses process boundaries intact (Ray pickles errors with their args)
        return type(self), (self.status, self.message, self.param, self.code, self.retry_after_s)

    @property
    def kind(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def api_error_of(err: GenerateError) -> ApiError:
    if err.kind == "context_length":
        return ApiError(400, err.message, err.param, "context_length_exceeded")
    if err.kind == "invalid_request":
        return ApiError(400, err.message, err.param)
    return ApiError(503, err.message)


@dataclass(frozen=True)
class Caller:
    name: str
    weight: float = 1.0
    admin: bool = False
    models: tuple[str, ...] | None = None
    system_prompt: str | None = None
    limited: bool = False  # has any quota: admission must wait for the ledger's answer


@dataclass
class RequestRecord:
    """What the ledger is told when the request ends."""

    endpoint: str
    arrived: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: dict[int, int] = field(default_factory=dict)  # choice -> tokens so far
    first_token_at: float | None = None
    engine_ttft_s: float | None = None  # the replica's own arrival-to-first-token (no transport)
    last_token_at: dict[int, float] = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)
    status: str = "ok"
    limited: bool = True  # the tenant has quotas: settle at once (else batched, see metering.py)

    @property
    def completion_total(self) -> int:
        return sum(self.completion_tokens.values())

    def saw(self, index: int, out: RequestOutput) -> None:
        self.completion_tokens[index] = len(out.token_ids)  # (a final output may add none after a Progress)
        if not out.new_token_ids:
            return
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self.engine_ttft_s = out.time_to_first_token_s
        if index in self.last_token_at:
            self.gaps.append((now - self.last_token_at[index]) / len(out.new_token_ids))
        self.last_token_at[index] = now


class FrontDoor:
    """`open_generation(request)` starts one generation and returns its stream of outputs with
    `cancel()` (mixserve.platform.generations: on the replicas, or in this process)."""

    def __init__(self, open_generation: Callable, ledger, router, model_name: str, checkpoint: str | WeightsSource,
                 tenants: list[dict], system_prompt: str | None = None, first_output_timeout_s: float = 300.0,
                 max_model_len: int | None = None):
        self.open_generation, self.ledger, self.router = open_generation, ledger, router
        # Bounds the wait for a request's first output: replicas starting from zero, or a burst.
        self.first_output_timeout_s = first_output_timeout_s
        self.model_name = model_name
        self.keys = KeyRing([Tenant.model_validate(t) for t in tenants])
        folder = checkpoint_folder(checkpoint)
        self.tokenizer = Tokenizer.from_checkpoint(folder)
        # The engine's context (prompt + output), for chat's default max_tokens: the engine's
        # max_model_len, which defaults to the model's max_position_embeddings.
        self.max_model_len = max_model_len or ModelArgs.from_folder(folder).max_position_embeddings
        self.names = TokenText(self.tokenizer.piece_bytes)
        self.system_prompt = resolve_system_prompt(system_prompt)
        self.meter = MeterBatch(ledger)
        self.live_leases: set[str] = set()  # admitted here and not settled yet (renewed every minute)
        self._renewing: asyncio.Task | None = None
        # Generations of requests received and not handed to the engine yet: an attention replica
        # in this process reads it (EngineFront.arrivals) to wait, when idle, for a burst's rest.
        self.arriving = 0

    def arrival(self) -> Arrival:
        """Counts a request that has just come in as on its way to the engine, from now until
        its generations are read (open_choices) or it fails: `with door.arrival() as arrival:`."""
        return Arrival(self)

    # ---- who, and may they -------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Caller:
        if self.keys.open:
            return Caller(ANONYMOUS, admin=True)
        if not authorization:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        tenant = self.keys.lookup(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise ApiError(401, "invalid API key")
        return Caller(tenant.name, tenant.weight, tenant.admin, tuple(tenant.models) if tenant.models is not None else None,
                      tenant.resolved_system_prompt(), tenant.has_limits)

    def check_model(self, caller: Caller, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist", "model", "model_not_found")
        if caller.models is not None and model not in caller.models:
            raise ApiError(403, f"tenant {caller.name!r} may not use model {model!r}", "model")

    def visible_models(self, caller: Caller) -> list[str]:
        return [m for m in [self.model_name] if caller.models is None or m in caller.models]

    # ---- prompts -----------------------------------------------------------------------------
    async def completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt is empty", "prompt")
            try:
                return await asyncio.to_thread(self.tokenizer.encode, prompt)  # off the event loop
            except InvalidRequestError as exc:
                raise ApiError(400, exc.message, "prompt") from None
        return list(prompt)

    async def chat_prompt(self, caller: Caller, messages: list[dict[str, str]]) -> list[int]:
        system = caller.system_prompt or self.system_prompt
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        try:
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        except InvalidRequestError as exc:
            raise ApiError(400, exc.message, exc.param) from None

    # ---- quotas ------------------------------------------------------------------------------
    async def admit(self, caller: Caller, record: RequestRecord, max_tokens: int) -> str:
        lease, prompt_tokens = f"lease-{uuid.uuid4().hex}", record.prompt_tokens
        if not caller.limited:  # nothing to refuse: metered in a batch, no call on the request's path
            self.meter.add("admit", (caller.name, prompt_tokens, max_tokens, lease))
            self._hold(lease)
            return lease
        try:
            admission = await self.ledger.admit.remote(caller.name, prompt_tokens, max_tokens, lease)
        except asyncio.CancelledError:
            # The client left while the ledger decided: it may have admitted the lease already,
            # and nothing else would end it (a settle that overtakes its admission still counts).
            record.status = "client_closed"
            self.settle(lease, record)
            raise
        if not admission.admitted:
            raise ApiError(429, admission.message, code="rate_limit_exceeded", retry_after_s=max(1, round(admission.retry_after_s)))
        self._hold(admission.lease)
        return admission.lease

    def _hold(self, lease: str) -> None:
        """Keeps an admitted lease renewed until it is settled."""
        self.live_leases.add(lease)
        if self._renewing is None or self._renewing.done():
            self._renewing = spawn_detached(self._renew_leases())

    async def _renew_leases(self) -> None:
        while self.live_leases:
            await asyncio.sleep(RENEW_LEASES_EVERY_S)
            if not self.live_leases:
                break
            await self.meter.flush()  # the batched admissions first: a lease must be held before it is renewed
            try:
                await self.ledger.renew.remote(list(self.live_leases))
            except Exception:  # noqa: BLE001 - tried again in a minute; a lease outlives a few misses
                log.warning("could not renew leases with the tenant ledger", exc_info=True)

    def settle(self, lease: str, record: RequestRecord) -> None:
        """Sends the settlement without holding up the response or a cancelled stream. It runs
        in a task with a fresh context: Serve cancels the calls a request makes when its client
        leaves, and a settlement sent while a disconnected request unwinds must still arrive,
        or the tenant's concurrency and token reservations stay held."""
        self.live_leases.discard(lease)
        ttft = record.first_token_at - record.arrived if record.first_token_at is not None else None
        args = (lease, record.prompt_tokens, record.completion_total, self.model_name, record.endpoint,
                record.status, ttft, record.gaps[-1000:], record.engine_ttft_s)
        if not record.limited:
            self.meter.add("settle", args)
            return
        spawn_detached(self._send_settlement(args))

    async def _send_settlement(self, args: tuple) -> None:
        try:
            await self.ledger.settle.remote(*args)
        except Exception:  # noqa: BLE001 - the lease expires on its own (TenantLedger lease_s)
            log.warning("could not settle a request with the tenant ledger", exc_info=True)

    # ---- generation --------------------------------------------------------------------------
    async def start(self, caller: Caller, prompt_ids: list[int], params: SamplingParams, n: int, chat: bool,
                    stream: bool, endpoint: str, arrival: Arrival | None = None, open_ended: bool = False) -> Run:
        """Admits the request and opens its n choices; refusals raise ApiError before any output.
        open_ended: a chat turn that names no max_tokens. It may run to the end of the context,
        as in OpenAI's API (and vLLM's): a default of a few tokens would cut every answer of a
        client that leaves it unset, as the official clients do. Its tokens/min reservation is
        OPEN_ENDED_RESERVE_TOKENS a choice, not the rest of the context (which would refuse it to
        every tenant whose limit is below a context, and let others run one at a time); what it
        really makes is charged when it ends. (A prompt that fills the context gets the engine's
        context_length_exceeded.)"""
        record = RequestRecord(endpoint, prompt_tokens=len(prompt_ids), limited=caller.limited)
        reserved = params.max_tokens
        if open_ended:
            params = dataclasses.replace(params, max_tokens=max(1, self.max_model_len - len(prompt_ids)))
            reserved = min(params.max_tokens, OPEN_ENDED_RESERVE_TOKENS)
        lease = await self.admit(caller, record, reserved * n)
        try:
            choices = await self.open_choices(caller, prompt_ids, params, n, chat, stream, arrival)
        except ApiError as err:
            record.status = str(err.status)
            self.settle(lease, record)
            raise
        except BaseException:  # the client left before the first output: its lease must end now, not at expiry
            record.status = "client_closed"
            self.settle(lease, record)
            raise
        return Run(self, lease, record, choices)

    async def open_choices(self, caller: Caller, prompt_ids: list[int], params: SamplingParams, n: int,
                           chat: bool, stream: bool = True, arrival: Arrival | None = None) -> Choices:
        """Starts n generations; errors about the request (bad input, context too long, no
        capacity) surface here, before any response is sent."""
        streams = []
        if arrival is not None:
            arrival.expect(n)
        try:
            for i in range(n):
                # (seeds live in [0, 2**63): choice i of a seed near the top wraps around)
                choice_params = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + i) % 2**63)
                request = GenerateRequest(prompt_ids, choice_params, chat, tenant=caller.name, weight=caller.weight, stream=stream)
                streams.append(self.open_generation(request))
            # Every choice's first output is awaited at once. Why: a generation in this process
            # posts its request to the engine on its first read, so reading them one by one put
            # each choice's prefill a whole step behind the one before (n=4: four prefill steps
            # before the response could start, instead of one step for all four).
            deadline = time.monotonic() + self.first_output_timeout_s
            outcomes = await asyncio.gather(*(self._first_output(s, deadline, arrival) for s in streams),
                                            return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            return Choices(streams, outcomes)
        except (ApiError, asyncio.CancelledError):  # refused, or the client left: every started choice ends
            _cancel(streams)
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to an ApiError
            _cancel(streams)
            raise _api_error_for(exc) from None

    async def _first_output(self, stream, deadline: float, arrival: Arrival | None = None) -> RequestOutput:
        """A choice's first output; ApiError when it fails or does not come before `deadline`."""
        async def read() -> RequestOutput | GenerateError | None:
            if arrival is not None:
                arrival.hand_over()  # an in-process generation reaches its engine within this first read
            return await anext(stream, None)

        try:
            first = await asyncio.wait_for(read(), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise ApiError(
                503, f"the model did not start serving within {self.first_output_timeout_s:g}s (it may be "
                "scaling up from zero, or overloaded); retry shortly", retry_after_s=COLD_RETRY_AFTER_S,
            ) from None
        if isinstance(first, GenerateError):
            raise api_error_of(first)
        if first is None:
            raise ApiError(503, "the attention replica ended the request without output; retry")
        return first


class Arrival:
    """One request's generations not handed to the engine yet, counted in FrontDoor.arriving."""

    def __init__(self, door: FrontDoor):
        self._door, self._pending = door, 0

    def __enter__(self) -> Arrival:
        self.expect(1)
        return self

    def __exit__(self, *exc_info) -> None:
        self._door.arriving -= self._pending  # whatever a refusal or failure never handed over
        self._pending = 0

    def expect(self, n: int) -> None:
        """The request will hand over n generations (its choices) in all."""
        self._door.arriving += n - self._pending
        self._pending = n

    def hand_over(self) -> None:
        if self._pending > 0:
            self._pending -= 1
            self._door.arriving -= 1


def _api_error_for(exc: Exception) -> ApiError:
    if isinstance(exc, BackPressureError):
        return ApiError(503, "the model is overloaded; retry shortly")
    if isinstance(exc, InvalidRequestError):  # ContextLengthError included
        return ApiError(400, exc.message, exc.param, "context_length_exceeded" if isinstance(exc, ContextLengthError) else None)
    return ApiError(503, f"the model is unavailable ({type(exc).__name__}); retry shortly")  # a replica died: retryable


class Run:
    """One admitted request: its merged outputs, and its settlement (exactly once)."""

    def __init__(self, door: FrontDoor, lease: str, record: RequestRecord, choices: Choices):
        self.door, self.lease, self.record, self.choices = door, lease, record, choices
        self._closed = False

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            async for i, out in self.choices.events():
                if isinstance(out, Progress):  # a non-streamed choice's count: charged if the client leaves
                    self.record.completion_tokens[i] = out.completion_tokens
                    continue
                self.record.saw(i, out)
                yield i, out
        except ApiError as err:
            self.record.status = str(err.status)
            raise

    async def finals(self) -> list[RequestOutput]:
        """Runs every choice to its end (a non-streamed request) and settles; outputs by choice."""
        finished: dict[int, RequestOutput] = {}
        try:
            async for i, out in self.events():
                if out.finished:
                    finished[i] = out
        except BaseException:
            self.close("client_closed")  # no-op on the status when events() already recorded an error
            raise
        finally:
            self.close()
        return [finished[i] for i in sorted(finished)]

    def close(self, status: str | None = None) -> None:
        """Aborts whatever still runs (a client that left frees its slots at once) and settles."""
        if self._closed:
            return
        self._closed = True
        if status is not None and self.record.status == "ok":
            self.record.status = status
        self.choices.close()
        self.door.settle(self.lease, self.record)


def _cancel(streams) -> None:
    for stream in streams:
        try:
            stream.cancel()
        except Exception:  # noqa: BLE001 - cancelling a call that already failed re-raises its error: it is over anyway
            pass


class Choices:
    """n running generations, merged into one stream of (choice index, output)."""

    def __init__(self, streams, firsts: list[RequestOutput]):
        self._streams, self._firsts = streams, firsts

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput | Progress]]:
        queue: asyncio.Queue = asyncio.Queue()
        for i, first in enumerate(self._firsts):
            queue.put_nowait((i, first))

        async def pump(i: int, stream) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which decides
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams) if not self._firsts[i].finished]
        remaining = len(self._streams)
        held: list[tuple[int, object]] = []  # read while coalescing, served next
        try:
            while remaining:
                i, item = held.pop(0) if held else await queue.get()
                # Outputs that piled up for this choice go out as one chunk (deltas joined).
                while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
                    j, following = queue.get_nowait()
                    if j == i and isinstance(following, RequestOutput):
                        item = merge_outputs(item, following)
                    else:
                        held.append((j, following))
                        break
                if isinstance(item, GenerateError):
                    raise api_error_of(item)
                if isinstance(item, Exception):
                    raise ApiError(503, f"generation failed ({type(item).__name__}); retry") from None
                yield i, item
                if not isinstance(item, Progress) and item.finished:
                    remaining -= 1
        finally:
            for task in tasks:
                task.cancel()
            _cancel(self._streams)  # a client that left aborts every choice and frees its slots

    def close(self) -> None:
        _cancel(self._streams)
