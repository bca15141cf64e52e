"""`LLM`: the model, its tokenizer and the engine in one process, for scripts and tests.

    from mixserve import LLM, SamplingParams
    llm = LLM("checkpoints/tiny-mixtral")
    outs = llm.generate(["a text prompt", [1, 415, 2936]], SamplingParams(max_tokens=32, temperature=0.0))
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from mixserve.replicas.engine import LLMEngine
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput

Prompt = str | list[int]


class LLM:
    def __init__(self, checkpoint: str | Path, **engine_options):
        """engine_options are EngineConfig fields (max_num_seqs, max_model_len, dtype, ...)."""
        self.engine = LLMEngine.from_checkpoint(checkpoint, EngineConfig(**engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

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
        added = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params_list):
                self.engine.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.engine.abort(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Iterator[RequestOutput]:
        """Yields a RequestOutput each time the request advances; `new_text` is the delta."""
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, params, chat=chat)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """One chat completion in the Mistral instruct format."""
        *_, last = self.stream(self.tokenizer.encode_chat(messages), params, chat=True)
        return last
