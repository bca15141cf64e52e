"""Continuous batching, admission, abort, stopping and bad input on the single-process engine."""

from __future__ import annotations

import pytest
import torch

from mixserve import LLM, SamplingParams
from mixserve.errors import ContextLengthError, InvalidRequestError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompt(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, 32000, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=40)
    prompts = [random_prompt(n, seed) for seed, n in enumerate([3, 57, 1 + 16, 30, 90, 2, 41])]
    lengths = [20, 7, 33, 1, 12, 25, 16]
    params = [SamplingParams(max_tokens=m, logprobs=2, **GREEDY) for m in lengths]
    batched = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, batched):
        alone = llm.generate([prompt], p)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_tokens and out.finish_reason == "length"
        for a, b in zip(out.logprobs, alone.logprobs):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < 1e-4


def test_fresh_prompts_attended_as_one_padded_batch_give_what_each_gets_alone(mixtral_dir):
    # One step admits all five (window 16): 16, 12, 9 and 7, 5 form two padded groups
    # (mixserve.model.cache.FreshPrefillGroup); alone, each prompt is attended by itself.
    llm = LLM(mixtral_dir, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)
    prompts = [random_prompt(n, seed) for seed, n in enumerate([5, 16, 9, 12, 7])]
    p = SamplingParams(max_tokens=6, logprobs=2, prompt_logprobs=True, **GREEDY)
    together = llm.generate(prompts, p)
    for prompt, out in zip(prompts, together):
        alone = llm.generate([prompt], p)[0]
        assert out.token_ids == alone.token_ids
        for a, b in zip(out.prompt_logprobs[1:] + out.logprobs, alone.prompt_logprobs[1:] + alone.logprobs):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) < 1e-4


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_ping_pong_micro_batches_change_nothing_in_the_results(mixtral_dir, micro_batches):
    prompts = [random_prompt(n, seed) for seed, n in enumerate([3, 57, 17, 30, 90, 2])]
    params = [SamplingParams(max_tokens=m, logprobs=1, **GREEDY) for m in (9, 5, 14, 3, 8, 11)]
    whole = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=40)
    split = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=40, micro_batches=micro_batches)
    for a, b in zip(whole.generate(prompts, params), split.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and max(abs(x[t] - y[t]) for t in x) < 1e-4


def test_prefill_heavy_steps_run_on_prefill_num_threads_and_decodes_on_num_threads(mixtral_dir):
    import threading

    seen: list[tuple[int, int]] = []  # (step tokens, threads during the step), read in the stepping thread
    results = {}

    def run() -> None:  # a thread of its own, as the replica's step thread, so the test's count is untouched
        llm = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4, num_threads=1, prefill_num_threads=2)
        model = llm.engine.model
        forward = model.forward

        def traced_forward(tokens, *args, **kwargs):
            seen.append((tokens.shape[0], torch.get_num_threads()))
            return forward(tokens, *args, **kwargs)

        model.forward = traced_forward
        results["split"] = llm.generate([random_prompt(100, 0), random_prompt(5, 1)], SamplingParams(max_tokens=6, **GREEDY))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert any(tokens > 64 for tokens, _ in seen) and any(tokens <= 64 for tokens, _ in seen)
    assert all(threads == (2 if tokens > 64 else 1) for tokens, threads in seen), seen
    plain = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4)
    expected = plain.generate([random_prompt(100, 0), random_prompt(5, 1)], SamplingParams(max_tokens=6, **GREEDY))
    assert [o.token_ids for o in results["split"]] == [o.token_ids for o in expected]


def test_heavy_ops_run_on_heavy_op_threads_and_the_rest_of_the_step_on_num_threads(mixtral_dir):
    import threading

    seen: dict[str, set[int]] = {"lm_head": set(), "experts": set(), "attention": set()}
    results = {}

    def run() -> None:  # its own thread, as the replica's step thread, so the test's count is untouched
        llm = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4, num_threads=1, heavy_op_threads=2)
        model = llm.engine.model

        def tracer(kind):
            return lambda module, args: seen[kind].add(torch.get_num_threads())

        model.output.register_forward_pre_hook(tracer("lm_head"))
        for block in model.layers:
            block.feed_forward.experts.register_forward_pre_hook(tracer("experts"))
            block.attention.register_forward_pre_hook(tracer("attention"))
        results["heavy"] = llm.generate([random_prompt(30, 0), random_prompt(5, 1)], SamplingParams(max_tokens=6, **GREEDY))
        results["threads_after"] = torch.get_num_threads()

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == {"lm_head": {2}, "experts": {2}, "attention": {1}}
    assert results["threads_after"] == 1
    plain = LLM(mixtral_dir, max_model_len=256, max_num_seqs=4)
    expected = plain.generate([random_prompt(30, 0), random_prompt(5, 1)], SamplingParams(max_tokens=6, **GREEDY))
    assert [o.token_ids for o in results["heavy"]] == [o.token_ids for o in expected]


def test_admission_waits_for_a_free_slot_and_every_request_finishes(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=128, max_num_seqs=2, max_num_batched_tokens=16)
    engine = llm.engine
    for i in range(5):
        engine.add_request(f"r{i}", random_prompt(10, i), SamplingParams(max_tokens=6, **GREEDY))
    seen_running = []
    finished = set()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished.add(out.request_id)
        seen_running.append(engine.num_running)
        assert engine.scheduler.slots.n_free + engine.num_running == 2
    assert max(seen_running) == 2
    assert finished == {f"r{i}" for i in range(5)}
    assert engine.scheduler.slots.n_free == 2


def test_abort_frees_the_slot_at_once_and_others_continue(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=128, max_num_seqs=2)
    engine = llm.engine
    engine.add_request("keep", random_prompt(8, 1), SamplingParams(max_tokens=10, **GREEDY))
    engine.add_request("drop", random_prompt(8, 2), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    assert engine.scheduler.slots.n_free == 0
    assert engine.abort("drop") is True
    assert engine.scheduler.slots.n_free == 1
    assert engine.abort("drop") is False  # second abort: nothing to do
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert {o.request_id for o in outs} == {"keep"}
    expected = llm.generate([random_prompt(8, 1)], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids
    assert outs[-1].token_ids == expected


def test_abort_of_a_waiting_request(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=128, max_num_seqs=1)
    engine = llm.engine
    engine.add_request("a", random_prompt(5, 1), SamplingParams(max_tokens=3, **GREEDY))
    engine.add_request("b", random_prompt(5, 2), SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    assert engine.num_waiting == 1
    assert engine.abort("b")
    assert engine.num_waiting == 0


@pytest.mark.parametrize(
    "prompt,params,error,param",
    [
        ("", SamplingParams(), InvalidRequestError, "prompt"),
        ([], SamplingParams(), InvalidRequestError, "prompt"),
        ([1, 32000], SamplingParams(), InvalidRequestError, "prompt"),
        ([1, -5], SamplingParams(), InvalidRequestError, "prompt"),
        ([1, "x"], SamplingParams(), InvalidRequestError, "prompt"),
        ([1] * 100, SamplingParams(max_tokens=200), ContextLengthError, "max_tokens"),
    ],
)
def test_bad_prompts_get_typed_errors_and_the_engine_keeps_serving(mixtral_dir, prompt, params, error, param):
    llm = LLM(mixtral_dir, max_model_len=256, max_num_seqs=2)
    engine = llm.engine
    engine.add_request("good", random_prompt(12, 3), SamplingParams(max_tokens=8, **GREEDY))
    engine.step()
    with pytest.raises(error) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.param == param and str(info.value)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].request_id == "good" and len(outs[-1].token_ids) == 8
    assert engine.scheduler.slots.n_free == 2


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(logprobs=50), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(stop=5), "stop"),
        (dict(stop=["x" * 1000]), "stop"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-1), "seed"),
        (dict(temperature=10**400), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(ignore_eos="no"), "ignore_eos"),
        (dict(top_k=None), "top_k"),
    ],
)
def test_bad_sampling_params_are_typed_errors(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_duplicate_request_id_is_refused(mixtral_dir):
    llm = LLM(mixtral_dir, max_model_len=64)
    llm.engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        llm.engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))
    llm.engine.abort("x")


def test_stop_token_ids_and_eos_end_the_request(mixtral_dir, mixtral_llm):
    prompt = random_prompt(10, 4)
    free = mixtral_llm.generate([prompt], SamplingParams(max_tokens=12, **GREEDY))[0]
    target = free.token_ids[5]
    first = free.token_ids.index(target)
    out = mixtral_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[target]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(mixtral_llm):
    prompt = random_prompt(10, 6)
    free = mixtral_llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    expected = free.text[: free.text.index(stop)]
    params = SamplingParams(max_tokens=20, temperature=0.0, stop=[stop])
    out = mixtral_llm.generate([prompt], params)[0]
    assert out.finish_reason == "stop" and out.text == expected
    streamed = "".join(o.new_text for o in mixtral_llm.stream(prompt, params))
    assert streamed == expected


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(mixtral_llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=100, seed=1234, ignore_eos=True)
    alone = mixtral_llm.generate([random_prompt(9, 7)], p)[0].token_ids
    again = mixtral_llm.generate([random_prompt(9, 7)], p)[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 3
    in_batch = mixtral_llm.generate([random_prompt(5, 1), random_prompt(9, 7), random_prompt(20, 2), random_prompt(3, 3)], [others[0], p, *others[1:]])
    assert alone == again == in_batch[1].token_ids
    other_seed = mixtral_llm.generate([random_prompt(9, 7)], SamplingParams(**{**p.__dict__, "seed": 99}))[0].token_ids
    assert other_seed != alone


def test_top_k_1_is_greedy_and_top_p_tiny_is_greedy(mixtral_llm):
    prompt = random_prompt(7, 8)
    greedy = mixtral_llm.generate([prompt], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids
    for extra in (dict(top_k=1), dict(top_p=1e-6)):
        p = SamplingParams(max_tokens=10, temperature=1.5, ignore_eos=True, seed=5, **extra)
        assert mixtral_llm.generate([prompt], p)[0].token_ids == greedy


def test_logprobs_hold_the_chosen_token_and_the_top_k(mixtral_llm):
    out = mixtral_llm.generate([random_prompt(6, 9)], SamplingParams(max_tokens=5, logprobs=3, prompt_logprobs=2, **GREEDY))[0]
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and len(lp) == 3  # greedy: the chosen token is the top one
        assert lp[token] == max(lp.values()) and all(v <= 0 for v in lp.values())
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 6
    for j, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert out.prompt_token_ids[j] in lp and 1 <= len(lp) <= 3


def test_text_prompt_gets_bos_and_text_is_the_decoded_continuation(mixtral_llm):
    out = mixtral_llm.generate("The mixture of experts", SamplingParams(max_tokens=8, **GREEDY))[0]
    tok = mixtral_llm.tokenizer
    assert out.prompt_token_ids[0] == tok.bos_id
    full = tok.decode(out.prompt_token_ids + out.token_ids)
    assert full == "The mixture of experts" + out.text


def test_streaming_deltas_add_up_to_the_final_text(mixtral_llm):
    pieces = list(mixtral_llm.stream(random_prompt(5, 10), SamplingParams(max_tokens=15, **GREEDY)))
    assert pieces[-1].finished and pieces[-1].finish_reason == "length"
    assert "".join(p.new_text for p in pieces) == pieces[-1].text
    assert sum(len(p.new_token_ids) for p in pieces) == 15


def test_closing_a_stream_early_frees_its_slot(mixtral_llm):
    engine = mixtral_llm.engine
    free_before = engine.scheduler.slots.n_free
    stream = mixtral_llm.stream(random_prompt(5, 11), SamplingParams(max_tokens=100, **GREEDY))
    next(stream)
    assert engine.scheduler.slots.n_free == free_before - 1
    stream.close()
    assert engine.scheduler.slots.n_free == free_before
    assert not engine.has_unfinished()


def test_generate_validates_every_prompt_before_running_any(mixtral_llm):
    with pytest.raises(InvalidRequestError):
        mixtral_llm.generate([[1, 2, 3], [1, 99999]], SamplingParams(max_tokens=2))
    assert not mixtral_llm.engine.has_unfinished()
    assert mixtral_llm.engine.scheduler.slots.n_free == mixtral_llm.engine.scheduler.slots.n_slots


def test_chat_answers_start_without_a_stray_space(mixtral_llm):
    out = mixtral_llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=6, **GREEDY))
    # SentencePiece's own decode drops exactly the first piece's space: the answer must read the same.
    assert out.finished and out.text == mixtral_llm.tokenizer.decode(out.token_ids)


def test_a_request_with_top_k_past_the_vocabulary_runs_beside_others(mixtral_llm):
    prompts = [random_prompt(6, 20), random_prompt(9, 21)]
    params = [SamplingParams(max_tokens=5, temperature=1.0, top_k=40000, seed=1), SamplingParams(max_tokens=5, **GREEDY)]
    outs = mixtral_llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [5, 5]
    assert outs[1].token_ids == mixtral_llm.generate([prompts[1]], params[1])[0].token_ids


def test_interleaved_streams_and_generate_lose_nothing(mixtral_llm):
    pa, pb = random_prompt(7, 30), random_prompt(11, 31)
    params_a, params_b = SamplingParams(max_tokens=12, **GREEDY), SamplingParams(max_tokens=4, **GREEDY)
    solo_a = mixtral_llm.generate([pa], params_a)[0]
    solo_b = mixtral_llm.generate([pb], params_b)[0]
    a, b = mixtral_llm.stream(pa, params_a), mixtral_llm.stream(pb, params_b)
    pieces_a, pieces_b = [next(a)], [next(b)]
    middle = mixtral_llm.generate([pb], params_b)[0]  # a whole request while both streams are open
    pieces_a.extend(a)  # B finishes while A is drained; its outputs wait in B's queue
    pieces_b.extend(b)
    assert "".join(p.new_text for p in pieces_a) == solo_a.text and pieces_a[-1].token_ids == solo_a.token_ids
    assert "".join(p.new_text for p in pieces_b) == solo_b.text and pieces_b[-1].finished
    assert middle.token_ids == solo_b.token_ids
    assert not mixtral_llm.engine.has_unfinished()


def test_stop_string_spanning_tokens_is_never_streamed(mixtral_llm):
    prompt = random_prompt(10, 40)
    free = mixtral_llm.generate([prompt], SamplingParams(max_tokens=24, **GREEDY))[0]
    tok = mixtral_llm.tokenizer
    pieces = [tok.piece_bytes[t].decode("utf-8", "replace") for t in free.token_ids]
    # a stop string made of the end of token 8 and the start of token 9
    stop = pieces[8][-2:] + pieces[9][:2]
    expected = free.text[: free.text.index(stop)]
    chunks = list(mixtral_llm.stream(prompt, SamplingParams(max_tokens=24, temperature=0.0, stop=[stop])))
    assert "".join(c.new_text for c in chunks) == expected and chunks[-1].text == expected
    assert all(stop not in c.text for c in chunks)


def test_sampled_rows_are_a_view_when_consecutive_and_a_gather_otherwise():
    from mixserve.replicas.engine import _rows_of

    logits = torch.arange(24.0).reshape(6, 4)
    for rows in ([0, 1, 2, 3, 4, 5], [2, 3], [5], [0, 2, 5], [3, 1], []):
        got = _rows_of(logits, rows)
        assert torch.equal(got, logits[rows])
        if rows:
            consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
            assert (got.data_ptr() == logits[rows[0]].data_ptr()) == consecutive
        else:
            assert got.shape == (0, 4)
