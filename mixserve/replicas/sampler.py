"""Turning a step's logits into tokens and log-probabilities, batched over sequences.

Shape legend: B = sequences sampling this step, V = vocab.
Random sampling inverts each row's cumulative distribution at one uniform draw: the token is
the first whose cumulative probability exceeds u * total. Why not the exponential race (argmax
of p / q, q ~ Exp(1), one draw per vocabulary entry): torch draws exponentials one element at a
time on CPUs, 0.55 ms for a 32000-entry row on the 2-core EPYC CI machine, so 18 ms a step at
32 sampled sequences; the odds, their float64 cumsum and searchsorted for all 32 rows take 1.2 to
1.8 ms (with top_k alone, passes after the topk run on its [B, k] candidates). Each seeded
request draws its u from its own generator, so its tokens do not depend on what else shares
the batch.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import Logprobs

# When every row has a top_k of at most this, sampling runs on the topk candidates alone.
TOP_K_DIRECT = 1024
# How many of the most likely tokens top_p looks at first, then next (see _outside_nucleus).
NUCLEUS_PREFIXES = (64, 1024)

# Per-thread scratch for the [B, V] passes, kept between steps. Why: a fresh 4 to 8 MB tensor per
# pass is a fresh mmap whose thousand pages fault in on first touch; on the 2-core VM that made
# 32 sampled rows cost 6.7 ms against 1.8 ms with memory reused. One engine steps in one thread.
_scratch = threading.local()

# exp() of anything below float32's normal range (about e^-87) makes denormals, which this CPU
# computes through microcode assists: a [32, 32000] exp took 8 to 12 ms with such inputs against
# 0.4 ms without. So exponents are clamped at -87 and the results at or below TAIL_ODDS set to 0:
# a token 1e37 times less likely than the row's top one is simply never drawn.
MIN_EXPONENT = -87.0
TAIL_ODDS = 1e-37


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] long: each row's most likely token (the first one on ties, a NaN if any,
    like torch.argmax). Why numpy on CPUs: torch's CPU argmax compares one element at a time,
    0.82 ms for 16 rows of 32000 on one thread of the 2-core EPYC CI machine, and numpy's
    vectorised one takes 0.04 ms (a decode step of tiny-mixtral at 16 sequences is 14 ms)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=1)).long()
    return logits.argmax(dim=-1)


def _odds_(scaled: torch.Tensor) -> torch.Tensor:
    """In place: scaled logits [B, V] -> exp(x - row max) [B, V], 1 for the top token, exactly 0
    for filtered ones (-inf) and the far tail."""
    scaled.sub_(scaled.amax(dim=-1, keepdim=True)).clamp_(min=MIN_EXPONENT).exp_()
    return F.threshold_(scaled, TAIL_ODDS, 0.0)


def _scratch_rows(name: str, dtype: torch.dtype, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] tensor of dtype from this thread's scratch slot `name` (contents undefined)."""
    key = (name, dtype, device, vocab)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.shape[0] < rows:
        # A normal tensor even when made under inference_mode: those may not be updated outside it.
        with torch.inference_mode(False):
            buf = buffers[key] = torch.empty(rows, vocab, dtype=dtype, device=device)
    return buf[:rows]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> list[int]:
    """logits [B, V] float32 -> one token id per row; row i uses params[i] and generators[i]
    (None = the engine's shared generator)."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return greedy_tokens(logits).tolist()
    gens = [generators[i] or default_generator for i in rows]
    if len(rows) == len(params):  # all sampled: no argmax pass, no gathered copy of the logits
        return _sample_rows(logits, params, gens).tolist()
    tokens = greedy_tokens(logits)  # greedy rows keep this
    tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows], gens)
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    scaled = torch.div(logits, temps[:, None], out=_scratch_rows("scaled", logits.dtype, *logits.shape, logits.device))  # [B, V]
    # A row with +inf (a logit over float32's range once divided by its temperature) or NaN has no
    # distribution: it takes its most likely token, and a stand-in keeps the filters' math finite.
    broken = ~torch.isfinite(scaled.amax(dim=-1))  # [B]
    any_broken = bool(broken.any())
    if any_broken:
        scaled[broken] = 0.0
    vocab = scaled.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params])  # k >= V: no filter
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
    filtered = (top_k > 0) & (top_k < vocab)
    if bool(filtered.all()) and int(top_k.max()) <= TOP_K_DIRECT:
        tokens = _sample_top_k(scaled, top_k, top_p, generators)
    else:
        if bool(filtered.any()):
            k_max = int(top_k.max())
            kth = scaled.topk(k_max, dim=-1).values  # [B, k_max]
            k_index = (torch.where(top_k > 0, top_k, k_max) - 1).clamp(max=scaled.shape[-1] - 1)
            threshold = kth.gather(1, k_index[:, None])
            threshold[top_k <= 0] = float("-inf")
            scaled.masked_fill_(scaled < threshold, float("-inf"))
        nucleus_rows = (top_p < 1).nonzero()[:, 0]
        if len(nucleus_rows) == len(params):  # the usual case, one top_p for all: no gathered copies
            scaled.masked_fill_(_outside_nucleus(scaled, top_p), float("-inf"))
        elif len(nucleus_rows):
            drop = _outside_nucleus(scaled[nucleus_rows], top_p[nucleus_rows])
            scaled[nucleus_rows] = scaled[nucleus_rows].masked_fill(drop, float("-inf"))
        tokens = _draw(scaled, generators)
    if any_broken:
        tokens[broken] = greedy_tokens(logits[broken])  # unscaled: the true maximum even where scaling overflowed
    return tokens


def _sample_top_k(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """Every row keeps at most its top_k (<= TOP_K_DIRECT) tokens: draw among those candidates,
    [B, k] instead of [B, V] for every pass after the topk itself."""
    k_max = int(top_k.max())
    candidates, ids = scaled.topk(k_max, dim=-1)  # [B, k], most likely first
    candidates.masked_fill_(torch.arange(k_max)[None, :] >= top_k[:, None], float("-inf"))  # rows with smaller k
    if bool((top_p < 1).any()):  # top_p after top_k: the nucleus of the renormalised candidates
        keep = _nucleus_of_sorted(candidates.softmax(dim=-1), top_p) | (top_p >= 1)[:, None]
        candidates.masked_fill_(~keep, float("-inf"))
    # Drawn in vocabulary order, like the full path: a seeded row then gets the same token for
    # the same draw whichever path its batch takes (its tokens may not depend on its neighbours).
    ids, order = ids.sort(dim=-1)
    return ids.gather(1, _draw(candidates.gather(1, order), generators)[:, None])[:, 0]


def _draw(scaled: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """scaled [B, N] filtered logits (-inf = never) -> per row the index of one draw, row i
    with generators[i]. Destroys scaled (its odds are computed in place)."""
    # Unnormalised probabilities, in place: the draw is scaled by each row's total anyway, and
    # every pass over [B, V] shows at 32 rows.
    odds = _odds_(scaled)  # [B, N]; a filtered entry is exactly 0
    # float64: near the total, float32 steps by 6e-8 of it, which would round rare tokens' shares to 0 or double them.
    cdf = _scratch_rows("cdf", torch.float64, *odds.shape, odds.device).copy_(odds).cumsum_(dim=-1)  # [B, N]: a filtered entry adds 0
    total = cdf[:, -1:]  # [B, 1]
    uniform = torch.cat([torch.rand(1, generator=generator, dtype=torch.float64) for generator in generators])  # [B]
    # Scaled by the row's own total and kept strictly below it, so the first entry whose cdf
    # exceeds the target always exists and always has probability > 0.
    targets = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, targets, right=True)[:, 0]  # [B]


def _outside_nucleus(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scaled [N, V] logits, top_p [N] -> drop [N, V]: True for each token outside the smallest
    set of most likely tokens whose mass reaches top_p (the most likely token always stays).

    Why prefixes first: a full sort of 32000 logits costs about 1.3 ms a row here, and topk's
    cost grows with k (32 rows: k=64 1.1 ms, 256 2.3 ms, 1024 5.5 ms), while real models put
    almost all their mass on a few dozen tokens. So each row's nucleus is looked for in its top
    NUCLEUS_PREFIXES[0] tokens (topk sorts them the same way), then in the next prefix for the
    rows whose nucleus reached past it, and only the rest are sorted whole."""
    n, vocab = scaled.shape
    odds = _odds_(_scratch_rows("nucleus", scaled.dtype, n, vocab, scaled.device).copy_(scaled))  # [N, V]
    total = odds.sum(dim=-1, keepdim=True)  # [N, 1]
    drop = torch.ones_like(odds, dtype=torch.bool)
    pending = torch.ones(n, dtype=torch.bool)  # rows whose nucleus is not found yet
    # A lower bound on each row's nucleus size, from what a prefix showed: past its k-th token no
    # probability exceeds the k-th, so reaching top_p takes at least k + (top_p - mass_k) / p_k
    # tokens. A row whose bound exceeds the next prefix skips it (a flat row goes straight to the sort).
    need = torch.zeros(n)
    for k in (*(p for p in NUCLEUS_PREFIXES if p < vocab), vocab):
        take = (pending & (need <= k) if k < vocab else pending).nonzero()[:, 0]  # [R]
        if not len(take):
            continue
        part = odds if len(take) == n else odds[take]  # [R, V]
        top, ids = part.topk(k, dim=-1) if k < vocab else part.sort(dim=-1, descending=True)  # [R, k]
        probs = top / total[take]
        keep = _nucleus_of_sorted(probs, top_p[take])
        found = ~keep[:, -1] if k < vocab else torch.ones(len(take), dtype=torch.bool)  # the cut fell inside
        if len(take) == n and bool(found.all()):  # the usual case: every row done at once
            return drop.scatter_(1, ids, ~keep)
        drop[take[found]] = torch.ones(int(found.sum()), vocab, dtype=torch.bool).scatter_(1, ids[found], ~keep[found])
        pending[take[found]] = False
        short = ~found
        mass, p_k = probs[short].sum(dim=-1), probs[short, -1].clamp_min(1e-30)
        need[take[short]] = k + (top_p[take[short]] - mass) / p_k
        if not bool(pending.any()):
            break
    return drop


def _nucleus_of_sorted(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """sorted_probs [N, k] most likely first, top_p [N] -> keep [N, k]: a token stays while the
    mass before it is still short of top_p; the most likely stays whatever top_p rounds to."""
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]
    keep[:, 0] = True
    return keep


def token_logprobs(logits: torch.Tensor, chosen: list[int], top_n: list[int]) -> list[Logprobs]:
    """Per row: {chosen: logprob, plus the top_n[i] most likely}. Model log-probabilities
    (before temperature and filters), chosen token first."""
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    chosen_lp = logp.gather(1, torch.tensor(chosen)[:, None])[:, 0].tolist()
    k = max(top_n, default=0)
    top_vals, top_ids = (logp.topk(k, dim=-1) if k else (None, None))
    result = []
    for i, token in enumerate(chosen):
        entry = {token: chosen_lp[i]}
        if top_n[i]:
            for tid, val in zip(top_ids[i, : top_n[i]].tolist(), top_vals[i, : top_n[i]].tolist()):
                entry.setdefault(tid, val)
        result.append(entry)
    return result
