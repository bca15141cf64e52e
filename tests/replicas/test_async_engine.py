from __future__ import annotations

import asyncio

import torch

from mixserve import LLM, SamplingParams
from mixserve.replicas.async_engine import AsyncEngine


def test_heavy_ops_stay_narrow_while_a_caller_waits_for_its_first_token(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4, num_threads=1, heavy_op_threads=2)
    seen: list[int] = []  # the LM head's intra-op threads, step by step (read in the step thread)
    llm.engine.model.output.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    engine = AsyncEngine(llm.engine)

    async def run() -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate([1, 415, 2936, 9060], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)):
            tokens = out.token_ids
        return tokens

    try:
        tokens = asyncio.run(run())
    finally:
        engine.shutdown()
    assert len(tokens) == 32 and len(seen) >= 32
    assert seen[0] == 1  # the prompt's step: its caller was waiting for the first token
    assert seen[-1] == 2  # later decode steps: nobody waiting, the LM head on two threads
    assert engine._awaiting_first == 0  # the count comes back down once the request ends
    want = llm.generate([[1, 415, 2936, 9060]], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    assert tokens == want.token_ids


def test_a_rejected_or_abandoned_request_stops_counting_as_waiting(mixtral_dir):
    import pytest

    from mixserve.errors import InvalidRequestError

    engine = AsyncEngine(LLM(mixtral_dir, max_model_len=256, max_num_seqs=4).engine)

    async def rejected() -> None:
        async for _ in engine.generate([], SamplingParams(max_tokens=4)):
            pass

    async def abandoned() -> None:
        stream = engine.generate([1, 415], SamplingParams(max_tokens=64, ignore_eos=True))
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the request is posted and counted
        assert engine._awaiting_first == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()

    try:
        with pytest.raises(InvalidRequestError):
            asyncio.run(rejected())
        assert engine._awaiting_first == 0
        asyncio.run(abandoned())
        assert engine._awaiting_first == 0
    finally:
        engine.shutdown()
