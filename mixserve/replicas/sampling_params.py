"""Per-request sampling parameters, validated on construction with typed, readable errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mixserve.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # streamed text is held back by the longest stop string; keep that short
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows float32)
MAX_SEED = 2**63 - 1


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
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {self.stop!r}", "stop")
        self.stop = list(self.stop or [])
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise InvalidRequestError("stop_token_ids must be a list of integers", "stop_token_ids")
        self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.prompt_logprobs, bool):
            self.prompt_logprobs = 0 if self.prompt_logprobs else None
        self.validate()

    def validate(self) -> None:
        _int_at_least("max_tokens", self.max_tokens, 1)
        if not _real(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError(
                f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}", "temperature"
            )
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k):
            raise InvalidRequestError(f"top_k must be an integer (-1 or 0 = off), got {self.top_k!r}", "top_k")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**63), got {self.seed!r}", "seed")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}", "ignore_eos")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be an integer in 0..{MAX_LOGPROBS}, got {value!r}", name)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", "stop")
        if any(not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise InvalidRequestError(f"stop strings must be non-empty strings of at most {MAX_STOP_LENGTH} characters", "stop")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers", "stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _int_at_least(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}", name)
