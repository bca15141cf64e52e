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
    assert engine.loop.no_output_yet == set()  # the request left the waiting set with its first output
    want = llm.generate([[1, 415, 2936, 9060]], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    assert tokens == want.token_ids


def test_a_rejected_or_abandoned_request_stops_counting_as_waiting(mixtral_dir):
    import pytest

    from mixserve.errors import InvalidRequestError

    # One cache slot: a second request queues behind the first and produces nothing until it ends.
    engine = AsyncEngine(LLM(mixtral_dir, max_model_len=256, max_num_seqs=1, max_num_batched_tokens=64).engine)
    long = SamplingParams(max_tokens=200, ignore_eos=True)

    async def rejected() -> None:
        async for _ in engine.generate([], SamplingParams(max_tokens=4)):
            pass

    async def abandoned() -> None:
        running = engine.generate([1, 415], long)
        await running.__anext__()  # the first request holds the only slot
        queued = engine.generate([1, 2936], long)
        task = asyncio.ensure_future(queued.__anext__())
        for _ in range(500):  # the step loop picks the command up between steps
            if len(engine.loop.no_output_yet) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(engine.loop.no_output_yet) == 1  # queued, no output yet: heavy ops stay narrow
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await queued.aclose()
        await running.aclose()

    try:
        with pytest.raises(InvalidRequestError):
            asyncio.run(rejected())
        assert engine.loop.no_output_yet == set()
        asyncio.run(abandoned())
        for _ in range(500):
            if engine.stats()["free_slots"] == 1 and not engine.loop.no_output_yet:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.loop.no_output_yet == set() and engine.stats()["free_slots"] == 1
    finally:
        engine.shutdown()
