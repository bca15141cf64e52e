"""AttentionReplica.generate: what a replica sends for a streamed and a non-streamed request
(a real engine in this process; the replica's Serve wiring is tested in tests/platform)."""

from __future__ import annotations

import asyncio

import pytest

from mixserve import LLM, SamplingParams
from mixserve.replicas import deployment
from mixserve.replicas.async_engine import AsyncEngine
from mixserve.replicas.deployment import AttentionReplica, GenerateRequest, Progress
from mixserve.replicas.sequence import RequestOutput


@pytest.fixture(scope="module")
def replica(mixtral_dir):
    replica = AttentionReplica.__new__(AttentionReplica)  # only generate() is used: no Serve, no process
    replica.engine = AsyncEngine(LLM(mixtral_dir, max_model_len=128, max_num_seqs=2, num_threads=1).engine)
    yield replica
    replica.engine.shutdown()


def sent(replica, stream: bool, max_tokens: int = 12) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def collect() -> list:
        return [item async for item in replica.generate(GenerateRequest([1, 415, 2936], params, stream=stream))]

    return asyncio.run(collect())


def test_a_non_streamed_request_gets_its_first_and_final_output_and_its_count_meanwhile(replica, monkeypatch):
    streamed = sent(replica, stream=True)
    assert len(streamed) == 12 and all(isinstance(o, RequestOutput) for o in streamed)

    monkeypatch.setattr(deployment, "PROGRESS_EVERY_S", 3600.0)  # no count falls due
    quiet = sent(replica, stream=False)
    assert [len(o.token_ids) for o in quiet] == [1, 12] and quiet[-1].finished
    assert quiet[-1].token_ids == streamed[-1].token_ids

    # Every output between the first and the last is due: each goes as a bare count.
    monkeypatch.setattr(deployment, "PROGRESS_EVERY_S", 0.0)
    counted = sent(replica, stream=False)
    assert isinstance(counted[0], RequestOutput) and isinstance(counted[-1], RequestOutput) and counted[-1].finished
    assert [p.completion_tokens for p in counted[1:-1]] == list(range(2, 12))
    assert all(isinstance(p, Progress) for p in counted[1:-1])
