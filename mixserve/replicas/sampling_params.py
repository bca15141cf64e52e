"""Per-request sampling parameters, validated on construction with typed, readable errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mixserve.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 is greedy. top_k <= 0 and top_p = 1 disable those filters. `logprobs=k`
    returns, per generated token, the chosen token's log-probability plus the k most likely;
    `prompt_logprobs` does the same for prompt tokens (True = the prompt token's alone).
    Log-probabilities are those of the model, before temperature and filtering.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: bool | int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.prompt_logprobs, bool):
            self.prompt_logprobs = 0 if self.prompt_logprobs else None
        self.validate()

    def validate(self) -> None:
        _int_at_least("max_tokens", self.max_tokens, 1)
        if not _real(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a number >= 0, got {self.temperature!r}", "temperature")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k):
            raise InvalidRequestError(f"top_k must be an integer, got {self.top_k!r}", "top_k")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be an integer in 0..{MAX_LOGPROBS}, got {value!r}", name)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers", "stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}", name)
