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


def _first_step_sizes(llm: LLM) -> list[int]:
    """Records how many requests each step advances (read in the step thread)."""
    sizes: list[int] = []
    step = llm.engine.step

    def counted():
        outputs = step()
        sizes.append(len(outputs))
        return outputs

    llm.engine.step = counted
    return sizes


def _announcing_engine(mixtral_dir, wait_ms: float, on_the_way: list[int]) -> tuple[LLM, AsyncEngine]:
    """An engine whose stand-in front door announces on_the_way[0] more requests with each one."""
    llm = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4, arrival_wait_ms=wait_ms)
    engine = AsyncEngine(llm.engine)
    engine.arrivals = lambda: on_the_way[0]
    return llm, engine


def test_an_idle_engine_waits_for_the_requests_its_front_door_announced(mixtral_dir):
    # The front door says one more request is on its way: the first waits for it (up to
    # arrival_wait_ms), and both prefill in the first step.
    on_the_way = [1]
    llm, engine = _announcing_engine(mixtral_dir, 1000, on_the_way)
    sizes = _first_step_sizes(llm)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    async def run() -> float:
        start = asyncio.get_running_loop().time()
        first = asyncio.ensure_future(anext(engine.generate([1, 415, 2936], params)))
        await asyncio.sleep(0.3)  # far longer than a step of this model
        on_the_way[0] = 0
        second = asyncio.ensure_future(anext(engine.generate([1, 9060], params)))
        await asyncio.gather(first, second)
        return asyncio.get_running_loop().time() - start

    try:
        elapsed = asyncio.run(run())
    finally:
        engine.shutdown()
    assert sizes[0] == 2  # one prefill step for both
    assert elapsed < 0.9  # it stepped when the announced request came, not at the deadline (1 s)


def test_a_lone_request_waits_for_nothing_and_an_announced_one_that_never_comes_for_at_most_the_limit(mixtral_dir):
    on_the_way = [0]
    _, engine = _announcing_engine(mixtral_dir, 600, on_the_way)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    async def time_to_first_output() -> float:
        start = asyncio.get_running_loop().time()
        await anext(engine.generate([1, 415, 2936], params))
        return asyncio.get_running_loop().time() - start

    try:
        alone = asyncio.run(time_to_first_output())
        on_the_way[0] = 3  # announced, never sent: the engine steps at the limit
        stranded = asyncio.run(time_to_first_output())
    finally:
        engine.shutdown()
    assert alone < 0.5
    assert 0.6 <= stranded < 3.0
