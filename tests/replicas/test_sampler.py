"""The sampler draws from the distribution it claims to, and its filters keep the right support."""

from __future__ import annotations

import pytest
import torch

from mixserve.replicas import sampler
from mixserve.replicas.sampler import sample, token_logprobs
from mixserve.replicas.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 4000


def frequencies(params: SamplingParams, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = LOGITS.expand(DRAWS, -1).contiguous()
    tokens = sample(rows, [params] * DRAWS, [None] * DRAWS, gen)
    return torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)).float() / DRAWS


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_matches_the_softmax(temperature):
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    got = frequencies(SamplingParams(temperature=temperature))
    # 4000 draws: the standard error of each frequency is below 0.008; allow 4 of them.
    assert torch.allclose(got, expected, atol=0.03), (got, expected)


def test_top_k_keeps_the_k_most_likely_renormalised():
    got = frequencies(SamplingParams(temperature=1.0, top_k=2))
    expected = torch.zeros(len(LOGITS))
    expected[:2] = torch.softmax(LOGITS[:2], dim=-1)
    assert got[2:].sum() == 0 and torch.allclose(got, expected, atol=0.03)


def test_rows_with_different_top_k_and_top_p_in_one_batch_each_get_their_own_filter():
    n = 2000
    rows = LOGITS.expand(3 * n, -1).contiguous()
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=1.0, top_k=3, top_p=0.7)] * n
    tokens = torch.tensor(sample(rows, params, [None] * (3 * n), torch.Generator().manual_seed(2)))
    assert (tokens[0::3] == 0).all()  # top_k 1: the most likely token only
    probs = torch.softmax(LOGITS[:3], dim=-1)  # top_k 3, renormalised
    freq = torch.bincount(tokens[1::3], minlength=len(LOGITS)).float() / n
    assert freq[3:].sum() == 0 and torch.allclose(freq[:3], probs, atol=0.035)
    # top_p 0.7 over those three (0.63, 0.23, 0.14): the nucleus is the first two, renormalised
    freq = torch.bincount(tokens[2::3], minlength=len(LOGITS)).float() / n
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], probs[:2] / probs[:2].sum(), atol=0.035)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, dim=-1)  # about 0.55, 0.20, 0.12, 0.07, ...
    p = float(probs[0] + probs[1]) - 1e-3  # needs the top two; the third is never reached
    got = frequencies(SamplingParams(temperature=1.0, top_p=p))
    assert got[2:].sum() == 0
    assert torch.allclose(got[:2], probs[:2] / probs[:2].sum(), atol=0.03)


def test_a_rare_token_keeps_its_own_share_of_the_unit_interval(monkeypatch):
    # 31999 tokens of p ~ 1.5e-8 behind one likely token: in float32 the cumulative sum near 1
    # steps by 6e-8 and most of them would get no share (never drawn) or a doubled one.
    logits = torch.full((32000,), -18.0)
    logits[0] = 0.0
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    rare = 20000
    draw = float((cdf[rare - 1] + cdf[rare]) / 2 / cdf[-1])  # the middle of that token's share
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor([draw], dtype=torch.float64))
    assert sample(logits[None], [SamplingParams(temperature=1.0)], [None], torch.Generator()) == [rare]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.9),
                                    SamplingParams(temperature=1e-4, top_k=3)])
def test_rows_without_a_distribution_take_their_most_likely_token(params):
    inf = float("inf")
    rows = torch.tensor([
        [-inf, -inf, -inf, inf],  # +inf: softmax would be all NaN
        [0.0, inf, 1.0, inf],  # the first of the +inf tokens
        [1e34, 2e34, -1e34, 0.0],  # finite, but over float32's range once divided by a small temperature
        [0.5, 2.0, 0.1, -1.0],  # an ordinary row in the same batch still samples
    ])
    tokens = sample(rows, [params] * 4, [None] * 4, torch.Generator().manual_seed(0))
    assert tokens[:3] == [3, 1, 1]
    assert 0 <= tokens[3] < 4


@pytest.mark.parametrize("prefixes", [(1,), (8, 64), (256,), (4, 1024), (4000,)])
def test_top_p_from_topk_prefixes_equals_a_full_sort(monkeypatch, prefixes):
    # Rows whose nucleus fits a prefix are cut there; the others are sorted whole. Either way
    # the kept set must be the one a full sort gives, for peaked and for flat rows.
    monkeypatch.setattr(sampler, "NUCLEUS_PREFIXES", prefixes)
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.1, 1.0, 4.0, 12.0]).repeat_interleave(4)  # flat ... peaked
    logits = torch.randn(16, 2000, generator=gen) * scales[:, None]
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.99]).repeat(4)
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]
    keep[:, 0] = True
    expected = torch.ones_like(keep).scatter_(1, order, ~keep)
    assert torch.equal(sampler._outside_nucleus(logits, top_p), expected)


def test_greedy_rows_and_sampled_rows_in_one_batch():
    n = 2000
    rows = torch.stack([LOGITS.flip(0), LOGITS] * n)  # even rows greedy, odd rows sampled
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * n
    tokens = torch.tensor(sample(rows, params, [None] * (2 * n), torch.Generator().manual_seed(1)))
    assert (tokens[0::2] == len(LOGITS) - 1).all()  # greedy rows: the argmax of the flipped logits
    freq = torch.bincount(tokens[1::2], minlength=len(LOGITS)).float() / n
    assert torch.allclose(freq, torch.softmax(LOGITS, dim=-1), atol=0.035)


@pytest.mark.parametrize("logits", [LOGITS, LOGITS.flip(0)])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=2),  # drawn among the topk candidates
        SamplingParams(temperature=1.0, top_p=0.7),  # drawn over the whole vocabulary, filtered
    ],
)
def test_draws_at_either_end_of_the_unit_interval_land_on_kept_tokens(monkeypatch, logits, params):
    # The sampler inverts a cumulative distribution at one uniform draw per row: the extreme
    # draws must land on the two tokens the filter kept (one at each end), never on a filtered one.
    kept = set(logits.topk(2).indices.tolist())
    got = set()
    for draw in (0.0, 1.0 - 2.0**-53):
        monkeypatch.setattr(torch, "rand", lambda *args, draw=draw, **kwargs: torch.tensor([draw], dtype=torch.float64))
        got.add(sample(logits[None].clone(), [params], [None], torch.Generator())[0])
    assert got == kept


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-39),  # 1 / T overflows float32
        SamplingParams(temperature=1e-50),  # T rounds to 0 in float32
        SamplingParams(temperature=1.0, top_p=1e-50),  # top_p rounds to 0
        SamplingParams(temperature=1.0, top_k=1),
    ],
)
def test_degenerate_settings_fall_back_to_the_most_likely_token(params):
    rows = LOGITS.flip(0).expand(50, -1).contiguous()
    assert set(sample(rows, [params] * 50, [None] * 50, torch.Generator())) == {len(LOGITS) - 1}


@pytest.mark.parametrize("top_k", [len(LOGITS), 40000, 10**30])
def test_top_k_at_or_past_the_vocabulary_filters_nothing(top_k):
    got = frequencies(SamplingParams(temperature=1.0, top_k=top_k))
    assert torch.allclose(got, torch.softmax(LOGITS, dim=-1), atol=0.03)


def test_token_logprobs_put_the_chosen_token_first_and_add_the_top_n():
    logp = torch.log_softmax(LOGITS, dim=-1)
    (entry,) = token_logprobs(LOGITS[None], chosen=[4], top_n=[2])
    assert list(entry) == [4, 0, 1]
    assert entry[4] == pytest.approx(logp[4].item()) and entry[0] == pytest.approx(logp[0].item())


def test_a_seeded_row_draws_the_same_token_whichever_path_its_batch_takes():
    # Alone, a top_k row is drawn among its topk candidates; next to a row without top_k the
    # batch takes the full-vocabulary path. A seeded request must not notice the difference.
    logits = torch.randn(2, 32000, generator=torch.Generator().manual_seed(5)) * 3
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    for seed in range(20):
        alone = sample(logits[:1].clone(), [params], [torch.Generator().manual_seed(seed)], torch.Generator())
        mixed = sample(logits.clone(), [params, SamplingParams(temperature=1.0)],
                       [torch.Generator().manual_seed(seed), None], torch.Generator())
        assert alone[0] == mixed[0]


def test_greedy_tokens_agree_with_torch_argmax_on_ties_nan_and_strided_rows():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 500, generator=gen)
    logits[1, 10] = logits[1, 400] = 50.0  # a tie: the first index wins
    logits[2, 77] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    logits[3] = float("-inf")
    logits[4, 499] = float("inf")
    for rows in (logits, logits[::2], logits[:, ::3], logits[:0]):
        want = rows.argmax(dim=-1) if rows.shape[0] else torch.empty(0, dtype=torch.long)
        got = sampler.greedy_tokens(rows)
        assert got.dtype == torch.long
        assert torch.equal(got, want)
    assert sampler.greedy_tokens(logits.double()).tolist() == logits.double().argmax(dim=-1).tolist()
