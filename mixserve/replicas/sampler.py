"""Turning a step's logits into tokens and log-probabilities, batched over sequences.

Shape legend: B = sequences sampling this step, V = vocab.
Random sampling uses the exponential race (argmax of p / q with q ~ Exp(1)), which draws
exactly from p; each seeded request draws its q from its own generator, so its tokens do not
depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import Logprobs


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> list[int]:
    """logits [B, V] float32 -> one token id per row; row i uses params[i] and generators[i]
    (None = the engine's shared generator)."""
    tokens = logits.argmax(dim=-1)  # greedy rows keep this
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        gens = [generators[i] or default_generator for i in rows]
        tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows], gens)
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    scaled = logits / temps[:, None]  # [B, V]
    vocab = scaled.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params])  # k >= V: no filter
    if bool(((top_k > 0) & (top_k < vocab)).any()):
        k_max = int(top_k.max())
        kth = scaled.topk(k_max, dim=-1).values  # [B, k_max]
        k_index = (torch.where(top_k > 0, top_k, k_max) - 1).clamp(max=scaled.shape[-1] - 1)
        threshold = kth.gather(1, k_index[:, None])
        threshold[top_k <= 0] = float("-inf")
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
    if bool((top_p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
        drop_sorted[:, 0] = False  # the most likely token always survives, whatever top_p rounds to
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    log_probs = scaled.log_softmax(dim=-1)
    race = torch.empty_like(log_probs)
    for i, generator in enumerate(generators):
        race[i].exponential_(generator=generator)
    # argmax p / q in the log domain; the clamp keeps a (vanishingly rare) q = 0 from giving inf - inf.
    return (log_probs - race.clamp_min(1e-30).log()).argmax(dim=-1)


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
