"""The engine stepping in a child process: same outputs as in-process, typed errors across the
pipe, slots freed on abandon, a dead child fails its callers at once, and no child outlives
its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from mixserve import LLM, SamplingParams
from mixserve.errors import CheckpointError, ContextLengthError, InvalidRequestError
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.engine_process import EngineProcessError, ProcessEngine
from mixserve.replicas.step_loop import EngineStepError

CONFIG = EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(mixtral_dir):
    engine = ProcessEngine(mixtral_dir, CONFIG)
    assert engine.stats() == {"running": 0, "waiting": 0, "free_slots": 4, "slots": 4}  # known from the start
    yield engine
    engine.shutdown()


async def _tokens(engine, prompt, params=GREEDY) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens = out.token_ids
    return tokens


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_concurrent_requests_get_what_the_in_process_engine_gives(engine, mixtral_dir):
    prompts = [[1, 415, 2936, 9060], [1, 22557], "the rolling cache", [1] + list(range(300, 360))]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(_tokens(engine, p) for p in prompts))

    got = asyncio.run(run())
    want = LLM(mixtral_dir, max_model_len=256).generate(prompts, GREEDY)
    assert got == [w.token_ids for w in want]
    assert engine.stats()["free_slots"] == CONFIG.max_num_seqs


def test_invalid_requests_raise_their_typed_error_across_the_pipe(engine):
    async def run(prompt, params) -> None:
        await _tokens(engine, prompt, params)

    with pytest.raises(InvalidRequestError) as bad_token:
        asyncio.run(run([1, 32000], GREEDY))
    assert bad_token.value.param == "prompt"
    with pytest.raises(ContextLengthError):
        asyncio.run(run([1, 415], SamplingParams(max_tokens=1000)))
    assert asyncio.run(_tokens(engine, [1, 415])) != []  # and it keeps serving


def test_an_abandoned_stream_frees_its_slot(engine):
    async def run() -> None:
        stream = engine.generate([1, 415], SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(run())
    assert _wait_for(lambda: engine.stats()["free_slots"] == CONFIG.max_num_seqs and engine.stats()["running"] == 0)


def test_a_killed_engine_process_fails_its_callers_and_refuses_new_requests(mixtral_dir):
    engine = ProcessEngine(mixtral_dir, CONFIG)

    async def run() -> float:
        stream = engine.generate([1, 415], SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        os.kill(engine.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineStepError):  # retryable, as a failed step is
            async for _ in stream:
                pass
        return time.monotonic() - start

    try:
        assert asyncio.run(asyncio.wait_for(run(), 10)) < 5
        assert not engine.alive
        with pytest.raises(EngineProcessError):
            asyncio.run(asyncio.wait_for(_tokens(engine, [1, 415]), 10))
    finally:
        engine.shutdown()


def test_a_bad_checkpoint_raises_its_error_at_start(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        ProcessEngine(tmp_path, CONFIG)


def test_the_engine_process_ends_with_its_parent(mixtral_dir):
    # The parent dies without any clean-up (as a replica killed by Ray does): the child sees its
    # command pipe close and exits, so no engine process outlives its replica.
    parent = subprocess.run(
        [sys.executable, "-c",
         "import os, sys\n"
         "from mixserve.replicas.engine_process import ProcessEngine\n"
         "from mixserve.replicas.engine_config import EngineConfig\n"
         f"engine = ProcessEngine({str(mixtral_dir)!r}, EngineConfig(max_model_len=64, max_num_seqs=1))\n"
         "print(engine.pid, flush=True)\n"
         "os._exit(0)\n"],
        capture_output=True, text=True, timeout=120,
    )
    child = int(parent.stdout.split()[-1])

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # an exited child of a dead parent is reaped by init; a zombie counts as gone
        with open(f"/proc/{child}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"

    assert _wait_for(gone, 15)
