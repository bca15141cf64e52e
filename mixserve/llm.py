"""`LLM`: the model, its tokenizer and the engine in one process, for scripts and tests.

    from mixserve import LLM, SamplingParams
    llm = LLM("checkpoints/tiny-mixtral")
    outs = llm.generate(["a text prompt", [1, 415, 2936]], SamplingParams(max_tokens=32, temperature=0.0))
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from mixserve.model.weights_source import WeightsSource
from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput

Prompt = str | list[int]


class LLM:
    """Runs requests through one engine. Every request has its own output queue, so streams and
    generate calls can be interleaved freely: whoever steps the engine files each output under
    its request, and nothing is dropped."""

    def __init__(self, checkpoint: str | Path | WeightsSource, **engine_options):
        """checkpoint: a local folder, s3://bucket/prefix, or any WeightsSource.
        engine_options are EngineConfig fields (max_num_seqs, max_model_len, dtype, ...)."""
        if isinstance(checkpoint, str) and checkpoint.startswith("s3://"):
            from mixserve.platform.weights import open_weights

            checkpoint = open_weights(checkpoint)
        self.engine = LLMEngine.from_checkpoint(checkpoint, EngineConfig(**engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        self._queues: dict[str, deque[RequestOutput]] = {}

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion through continuous batching; outputs in prompt order.

        All prompts are validated before any runs, so one bad prompt raises and runs nothing.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        final: dict[str, RequestOutput] = {}
        try:
            for request_id, prompt, p in zip(ids, prompts, params_list):
                self._add(request_id, prompt, p)
            for request_id in ids:
                out = self._next_output(request_id)
                while not out.finished:
                    out = self._next_output(request_id)
                final[request_id] = out
        finally:
            for request_id in ids:
                self._release(request_id)
        return [final[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Iterator[RequestOutput]:
        """Yields a RequestOutput each time the request advances; `new_text` is the delta.
        Closing the generator early aborts the request and frees its cache slot."""
        request_id = f"stream-{next(self._ids)}"
        self._add(request_id, prompt, params, chat=chat)
        try:
            while True:
                out = self._next_output(request_id)
                yield out
                if out.finished:
                    return
        finally:
            self._release(request_id)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """One chat completion in the Mistral instruct format."""
        *_, last = self.stream(self.tokenizer.encode_chat(messages), params, chat=True)
        return last

    # ---- plumbing -------------------------------------------------------------------------
    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams | None, chat: bool = False) -> None:
        self.engine.add_request(request_id, prompt, params, chat=chat)
        self._queues[request_id] = deque()

    def _next_output(self, request_id: str) -> RequestOutput:
        queue = self._queues[request_id]
        while not queue:
            if not self.engine.has_request(request_id):
                raise RuntimeError(f"request {request_id} left the engine without a final output")
            for out in self.engine.step():
                target = self._queues.get(out.request_id)
                if target is not None:
                    target.append(out)
        return queue.popleft()

    def _release(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._queues.pop(request_id, None)
