"""One request's state inside the engine, and the output it reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from mixserve.replicas.detokenizer import IncrementalDetokenizer
from mixserve.replicas.sampling_params import SamplingParams

Logprobs = dict[int, float]


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no cache slot yet
    RUNNING = "running"  # holds a cache slot: prefilling or decoding
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """A snapshot of a request after a step. `new_text`/`new_token_ids` are what this step
    added (for streaming); `text`/`token_ids` are everything so far."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[Logprobs] | None
    prompt_logprobs: list[Logprobs | None] | None
    time_to_first_token_s: float | None = None  # in the engine: arrival to first token (queueing + prefill)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None  # per-request RNG when a seed is given
    arrival: float
    tenant: str = ""  # whose request, for weighted fair scheduling ("" = anonymous)
    weight: float = 1.0  # the tenant's priority weight
    status: Status = Status.WAITING
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are already in the cache
    prefill_until: int = 0  # tokens to compute in prefill mode: the prompt, or everything known after a preemption
    first_token_at: float | None = None  # time.monotonic() when the first output token was sampled
    text: str = ""
    emitted_text_len: int = 0
    emitted_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None

    def __post_init__(self) -> None:
        self.prefill_until = self.prefill_until or len(self.prompt_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prefill_until

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt log-probs still to compute (never again when a preempted sequence recomputes)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len

    def preempt(self) -> None:
        """Drops the cache: everything known so far is recomputed as a prefill when it runs again,
        and the chunk that completes it samples the next token, as a decode step would have."""
        self.prefill_until = self.prompt_len + len(self.output_ids)
        self.num_computed = 0

    def token_at(self, position: int) -> int:
        return self.prompt_ids[position] if position < self.prompt_len else self.output_ids[position - self.prompt_len]

    def next_input(self, length: int) -> list[int]:
        start = self.num_computed
        return [self.token_at(p) for p in range(start, start + length)]

    def snapshot(self) -> RequestOutput:
        """What the caller sees now; marks the returned text and tokens as emitted.

        While running, text that could still turn out to start a stop string is held back.
        """
        finished = self.status is Status.FINISHED
        hold = 0 if finished else max(self.params.max_stop_len - 1, 0)
        visible = max(len(self.text) - hold, self.emitted_text_len)
        new_text = self.text[self.emitted_text_len : visible]
        new_ids = self.output_ids[self.emitted_tokens :]
        self.emitted_text_len, self.emitted_tokens = visible, len(self.output_ids)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            token_ids=list(self.output_ids),
            text=self.text[:visible],
            new_token_ids=new_ids,
            new_text=new_text,
            finished=finished,
            finish_reason=self.finish_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            time_to_first_token_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
        )
