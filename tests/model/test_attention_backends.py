"""Backend selection everywhere; SDPA's grouped fresh prompts against one call each;
flash-attn against SDPA where a GPU is present."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mixserve.model.attention_backends import SdpaBackend, make_backend
from mixserve.model.cache import SequenceChunk, build_step_metadata

CUDA = torch.cuda.is_available()


def test_auto_is_sdpa_on_cpu_and_for_float32():
    assert isinstance(make_backend("auto", "cpu", torch.float32), SdpaBackend)
    assert isinstance(make_backend("auto", "cpu", torch.bfloat16), SdpaBackend)


@pytest.mark.parametrize(
    "name,device,dtype,needle",
    [
        ("flash", "cpu", torch.bfloat16, "needs device='cuda'"),
        ("flash", "cuda", torch.float32, "bfloat16 or float16"),
        ("magic", "cpu", torch.float32, "unknown attention backend"),
    ],
)
def test_impossible_backends_are_refused_with_a_reason(name, device, dtype, needle):
    with pytest.raises(ValueError, match=needle):
        make_backend(name, device, dtype)


def test_grouped_fresh_prompts_attend_and_cache_exactly_as_one_call_each():
    gen = torch.Generator().manual_seed(0)
    window, n_heads, n_kv, head_dim = 8, 4, 2, 16
    chunks = [SequenceChunk(0, 11, 1),  # a decode over a wrapped cache
              SequenceChunk(1, 0, 5), SequenceChunk(2, 3, 4),  # fresh, then a continued prompt
              SequenceChunk(3, 0, 4), SequenceChunk(4, 0, 5), SequenceChunk(5, 0, 8),  # fresh, padded to 8
              SequenceChunk(6, 0, 2), SequenceChunk(7, 0, 2)]  # equal and adjacent: a group that is a slice
    meta = build_step_metadata(chunks, window)
    assert [g.slots.tolist() for g in meta.fresh_groups] == [[1, 3, 4, 5], [6, 7]]  # the cases under test
    assert meta.fresh_groups[1].gather is None
    one_by_one = dataclasses.replace(meta, fresh_groups=[], single_prefills=meta.prefills)
    t = sum(c.length for c in chunks)
    q, k, v = (torch.randn(t, heads, head_dim, generator=gen) for heads in (n_heads, n_kv, n_kv))

    class Pool:  # the backend reads k, v and window
        def __init__(self):
            self.k, self.v = (torch.randn(1, 8, n_kv, window, head_dim, generator=gen) for _ in range(2))
            self.window = window

    grouped_cache, single_cache = Pool(), Pool()
    single_cache.k, single_cache.v = grouped_cache.k.clone(), grouped_cache.v.clone()
    got = SdpaBackend()(0, q, k, v, meta, grouped_cache)
    want = SdpaBackend()(0, q, k, v, one_by_one, single_cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for c in chunks:  # every position a sequence holds; pads only past a fresh prompt's end
        held = slice(0, window) if c.start else slice(0, c.length)
        for a, b in ((grouped_cache.k, single_cache.k), (grouped_cache.v, single_cache.v)):
            torch.testing.assert_close(a[0, c.slot, :, held], b[0, c.slot, :, held], rtol=0, atol=0)


@pytest.mark.parametrize("start,length", [(0, 16), (0, 21), (5, 16), (13, 27), (30, 35)])
def test_a_chunk_of_several_windows_attends_in_blocks_exactly_as_the_whole_masked_chunk(start, length):
    # W = 8: from 16 tokens on, the chunk is attended W queries at a time (WindowBlocks); the
    # reference scores every query against the whole cache and chunk under the window mask.
    gen = torch.Generator().manual_seed(start + length)
    window, n_heads, n_kv, head_dim = 8, 4, 2, 16
    meta = build_step_metadata([SequenceChunk(0, start, length)], window)
    (p,) = meta.single_prefills
    assert p.blocks is not None and p.bias is None
    q, k, v = (torch.randn(length, heads, head_dim, generator=gen) for heads in (n_heads, n_kv, n_kv))

    class Pool:  # the backend reads k, v and window
        def __init__(self):
            self.k, self.v = (torch.randn(1, 1, n_kv, window, head_dim, generator=gen) for _ in range(2))
            self.window = window

    pool = Pool()
    cached_k, cached_v = pool.k[0, 0, :, : p.cached_len].clone(), pool.v[0, 0, :, : p.cached_len].clone()
    got = SdpaBackend()(0, q, k, v, meta, pool)

    keys = torch.cat([cached_k, k.transpose(0, 1)], dim=1).repeat_interleave(n_heads // n_kv, dim=0)  # [H, Lc + C, Dh]
    values = torch.cat([cached_v, v.transpose(0, 1)], dim=1).repeat_interleave(n_heads // n_kv, dim=0)
    scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) / head_dim**0.5  # [H, C, Lc + C]
    scores = scores.masked_fill(~p.mask, float("-inf"))
    want = (scores.softmax(-1) @ values).transpose(0, 1)  # [C, H, Dh]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The cache then holds the chunk's last W keys, each at its position mod W.
    last = torch.arange(start + length - window, start + length)
    torch.testing.assert_close(pool.k[0, 0][:, last % window], k[last - start].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_flash_attention_matches_sdpa_on_gpu(mixtral_dir):
    pytest.importorskip("flash_attn", reason="needs the gpu extra (flash-attn)")
    from mixserve import LLM, SamplingParams

    prompt = [1] + torch.randint(3, 32000, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, prompt_logprobs=True, logprobs=0)
    outs = {}
    for backend in ("sdpa", "flash"):
        llm = LLM(mixtral_dir, device="cuda", dtype="bfloat16", attention_backend=backend, max_model_len=256,
                  max_num_batched_tokens=32)
        outs[backend] = llm.generate([prompt], params)[0]
    a, b = outs["sdpa"], outs["flash"]
    diffs = [abs(x[t] - y[t]) for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], prompt[1:])]
    assert max(diffs) < 5e-2, max(diffs)
    agree = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
    assert agree >= 30, (a.token_ids, b.token_ids)  # bf16 near-ties may flip a late token
