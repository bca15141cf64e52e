"""Rolling-buffer cache: metadata, chunked prefill equals unchunked, flat memory past W."""

from __future__ import annotations

import torch

from mixserve import LLM, SamplingParams
from mixserve.model.cache import SequenceChunk, build_step_metadata

T, F = True, False


def test_metadata_matches_the_worked_example():
    # The docstring of mixserve.model.cache: W = 3, seq A decoding position 7, seq B prefilling 3..5.
    meta = build_step_metadata([SequenceChunk(0, 7, 1), SequenceChunk(1, 3, 3)], window=3)
    assert meta.positions.tolist() == [7, 3, 4, 5]
    assert meta.n_decode == 1
    assert meta.decode_write_index.tolist() == [1]
    assert meta.decode_mask[:, 0, 0].tolist() == [[T, T, T]]
    (pre,) = meta.prefills
    assert pre.cached_len == 3 and pre.write_index.tolist() == [0, 1, 2]
    assert pre.mask.tolist() == [
        [F, T, T, T, F, F],
        [F, F, T, T, T, F],
        [F, F, F, T, T, T],
    ]


def test_wrapped_cache_positions_are_masked_by_position_not_index():
    # W = 4, chunk at positions 10..12: cache index i holds position 9 - ((9 - i) % 4) = [8, 9, 6, 7].
    meta = build_step_metadata([SequenceChunk(0, 10, 3)], window=4)
    (pre,) = meta.prefills
    cache_part = pre.mask[:, :4]
    # query 10 sees positions 7, 8, 9; query 11 sees 8, 9; query 12 sees 9.
    assert cache_part.tolist() == [[T, T, F, T], [T, T, F, F], [F, T, F, F]]
    assert pre.write_index.tolist() == [2, 3, 0]


def test_a_chunk_longer_than_the_window_sees_only_its_window_and_writes_its_last_w_keys():
    # W = 3, a 7-token chunk at positions 2..8 after 2 cached tokens (positions 0, 1 at indices 0, 1).
    meta = build_step_metadata([SequenceChunk(0, 2, 7)], window=3)
    (pre,) = meta.prefills
    assert (pre.cached_len, pre.write_from) == (2, 4)
    assert pre.write_index.tolist() == [0, 1, 2]  # positions 6, 7, 8: the chunk's last W
    # Two windows or more: attended W queries at a time (WindowBlocks), whose masks are the
    # whole chunk's mask cut into blocks: the first W queries over the cache and the first W keys,
    # then the band every later block shares (its keys start W - 1 before its first query).
    blocks = pre.blocks
    assert pre.bias is None and (blocks.n_band, blocks.n_tail) == (1, 1)
    assert torch.equal(blocks.head_bias[0, 0] == 0, pre.mask[:3, :5])
    assert torch.equal(blocks.band_bias[0, 0] == 0, pre.mask[3:6, 2 + 1:2 + 6])
    assert torch.equal(blocks.band_bias[0, 0, :1, :3] == 0, pre.mask[6:, 2 + 4:])
    assert blocks.band_bias[blocks.band_bias != 0].eq(float("-inf")).all()
    assert pre.mask.tolist() == [
        # cache 0 1 | chunk 2  3  4  5  6  7  8
        [T, T, T, F, F, F, F, F, F],  # query 2 sees 0, 1, 2
        [F, T, T, T, F, F, F, F, F],  # query 3 sees 1, 2, 3
        [F, F, T, T, T, F, F, F, F],
        [F, F, F, T, T, T, F, F, F],
        [F, F, F, F, T, T, T, F, F],
        [F, F, F, F, F, T, T, T, F],
        [F, F, F, F, F, F, T, T, T],  # query 8 sees 6, 7, 8
    ]


def test_a_prompt_of_several_windows_prefills_in_one_step(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=256)
    engine = llm.engine
    prompt = list(range(3, 3 + 5 * engine.window + 3))
    engine.add_request("long", prompt, SamplingParams(max_tokens=2, temperature=0.0))
    first = engine.step()
    assert [len(out.token_ids) for out in first] == [1]  # the whole prompt ran, a token was sampled
    engine.abort("long")


def test_chunked_prefill_equals_unchunked(mixtral_dir):
    prompt = torch.randint(3, 32000, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=True, logprobs=0)
    results = []
    # The whole prompt in one step (over 5 windows), 4 windows, the window, an odd size, token by token.
    for chunk in (None, 64, 16, 7, 1):
        llm = LLM(mixtral_dir, max_model_len=256, prefill_chunk_size=chunk)
        results.append(llm.generate([prompt], params)[0])
    base = results[0]
    for other in results[1:]:
        assert other.token_ids == base.token_ids
        for a, b in zip(base.prompt_logprobs[1:], other.prompt_logprobs[1:]):
            assert abs(a[next(iter(a))] - b[next(iter(a))]) < 1e-4
        for a, b in zip(base.logprobs, other.logprobs):
            assert a.keys() == b.keys() and abs(next(iter(a.values())) - next(iter(b.values()))) < 1e-4


def test_cache_memory_per_sequence_is_flat_beyond_the_window(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=512, max_num_seqs=2)
    engine = llm.engine
    window = engine.window
    args = engine.args
    expected_per_slot = 2 * args.n_layers * args.n_kv_heads * window * args.head_dim * 4
    assert engine.cache.bytes_per_slot == expected_per_slot
    before = (engine.cache.nbytes, engine.cache.k.data_ptr(), engine.cache.k.shape)
    measured = []
    for n_tokens in (window // 2, 4 * window, 12 * window):
        out = llm.generate([1, 100, 200], SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == n_tokens
        measured.append(engine.cache.nbytes / engine.cache.n_slots)
    # Same storage, same size, whether a sequence ran half a window or twelve windows.
    assert (engine.cache.nbytes, engine.cache.k.data_ptr(), engine.cache.k.shape) == before
    assert measured == [expected_per_slot] * 3
    assert engine.cache.k.shape[3] == window == 16


def test_every_metadata_tensor_lives_on_the_requested_device():
    meta = build_step_metadata([SequenceChunk(0, 7, 1), SequenceChunk(1, 3, 3)], window=4, device="meta")
    tensors = [meta.positions, meta.decode_slots, meta.decode_write_index, meta.decode_mask]
    tensors += [t for p in meta.prefills for t in (p.mask, p.bias, p.write_index)]
    assert all(t.device.type == "meta" for t in tensors)
    padded = build_step_metadata([SequenceChunk(0, 0, 3), SequenceChunk(1, 0, 2)], window=4, device="meta")
    (group,) = padded.fresh_groups
    assert all(t.device.type == "meta" for t in (group.slots, group.step_rows, group.gather, group.padded_rows))


def test_fresh_prompts_group_as_the_worked_example_says():
    # mixserve.model.cache.FreshPrefillGroup: 2 decodes, then fresh prompts of 3 and 2 tokens.
    meta = build_step_metadata([SequenceChunk(0, 9, 1), SequenceChunk(1, 4, 1), SequenceChunk(5, 0, 3),
                                SequenceChunk(7, 0, 2)], window=4)
    (group,) = meta.fresh_groups
    assert meta.single_prefills == [] and len(meta.prefills) == 2
    assert group.slots.tolist() == [5, 7] and group.length == 3
    assert group.gather.tolist() == [2, 3, 4, 5, 6, 6]
    assert group.step_rows.tolist() == [2, 3, 4, 5, 6] and group.padded_rows.tolist() == [0, 1, 2, 3, 4]


def test_only_fresh_prompts_within_twice_each_others_length_group():
    chunks = [SequenceChunk(0, 0, 4), SequenceChunk(1, 0, 4),  # equal and adjacent: a plain slice
              SequenceChunk(2, 5, 4),  # continues a prompt: attends to its cache, alone
              SequenceChunk(3, 0, 9),  # longer than the window: needs the window mask, alone
              SequenceChunk(4, 0, 2),  # the longest of its group (6) would be over twice its length
              SequenceChunk(5, 0, 3), SequenceChunk(6, 0, 6)]
    meta = build_step_metadata(chunks, window=8)
    assert [g.slots.tolist() for g in meta.fresh_groups] == [[0, 1, 5, 6]]  # in step order
    assert meta.fresh_groups[0].length == 6
    assert [p.slot for p in meta.single_prefills] == [2, 3, 4]
    equal = build_step_metadata(chunks[:2], window=8).fresh_groups[0]
    assert equal.step_rows == slice(0, 8) and equal.gather is None and equal.padded_rows is None
    apart = build_step_metadata([chunks[0], chunks[2], chunks[1]], window=8).fresh_groups[0]  # equal, not adjacent
    assert apart.gather.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and apart.padded_rows is None
