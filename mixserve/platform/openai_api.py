"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions.

Requests are pydantic models (FastAPI validates bodies with them and publishes them in the
OpenAPI schema); responses are plain dicts built here, so the HTTP ingress only routes.
Extensions beyond OpenAI's API: top_k and ignore_eos.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mixserve.replicas.sampling_params import MAX_LOGPROBS, SamplingParams
from mixserve.replicas.sequence import RequestOutput

MAX_N = 8  # choices per request: each is a full generation, so keep the fan-out bounded


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send a last chunk with usage and no choices.")


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="Served model name (see /v1/models).")
    max_tokens: int | None = Field(None, description="Most tokens to generate per choice (default: completions 16, "
                                   "chat the rest of the model's context, as OpenAI's API).")
    temperature: float = Field(1.0, description="0 is greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(-1, description="Extension: keep the k most likely tokens (-1 = off).")
    seed: int | None = Field(None, description="Seed for reproducible sampling (choice i uses seed + i).")
    stop: str | list[str] | None = Field(None, description="Stop strings, cut from the text.")
    n: int = Field(1, ge=1, le=MAX_N, description=f"Choices to generate (at most {MAX_N}).")
    stream: bool = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (include_usage).")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence.")
    user: str | None = Field(None, description="Accepted for compatibility; not stored.")

    def sampling_params(self, logprobs: int | None, default_max_tokens: int = 16) -> SamplingParams:
        """Raises InvalidRequestError (a 400) on values the engine would refuse."""
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            stop=self.stop, logprobs=logprobs, ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(..., description="Text, or token ids used exactly as given.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top log-probabilities per generated token.")
    echo: bool = Field(False, description="Not supported: must be false.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"] = Field(..., description="Who wrote the message.")
    content: str = Field(..., description="The message text.")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far, ending with a user turn.")
    logprobs: bool = Field(False, description="Return log-probabilities of the generated tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Most likely alternatives per token (needs logprobs).")
    max_completion_tokens: int | None = Field(None, description="Newer name of max_tokens (default: the rest of the context).")

    def sampling_params(self, logprobs: int | None = None, default_max_tokens: int = 16) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params((self.top_logprobs or 0) if self.logprobs else None, default_max_tokens)


# ---- responses -------------------------------------------------------------------------------


class TokenText:
    """Token id -> the text and bytes OpenAI's logprobs fields show."""

    def __init__(self, piece_bytes: list[bytes]):
        self._bytes = piece_bytes

    def bytes_of(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def text(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", errors="backslashreplace")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[int], logprobs: list[dict[int, float]], text_offset: int, names: TokenText) -> dict:
    """OpenAI completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for token, lps in zip(tokens, logprobs):
        out["tokens"].append(names.text(token))
        out["token_logprobs"].append(lps.get(token))
        out["top_logprobs"].append({names.text(t): lp for t, lp in sorted(lps.items(), key=lambda kv: -kv[1])})
        out["text_offset"].append(offset)
        offset += len(names.text(token))
    return out


def chat_logprobs(tokens: list[int], logprobs: list[dict[int, float]], top: int, names: TokenText) -> dict:
    """OpenAI chat shape: content = [{token, logprob, bytes, top_logprobs: [...]}]."""
    content = []
    for token, lps in zip(tokens, logprobs):
        best = sorted(lps.items(), key=lambda kv: -kv[1])[:top]
        content.append({
            "token": names.text(token), "logprob": lps.get(token), "bytes": list(names.bytes_of(token)),
            "top_logprobs": [{"token": names.text(t), "logprob": lp, "bytes": list(names.bytes_of(t))} for t, lp in best],
        })
    return {"content": content}


def new_logprobs(out: RequestOutput) -> tuple[list[int], list[dict[int, float]]]:
    """The tokens this output adds, with their log-probabilities."""
    n = len(out.new_token_ids)
    return out.new_token_ids, (out.logprobs or [])[len(out.logprobs or []) - n:] if n else []
