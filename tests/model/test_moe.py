"""Top-2 gating and dropless grouped expert compute against a plain per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixserve.model.moe import LocalExperts, group_by_expert, top_k_gating


def naive_moe(x, logits, w13, w2, k):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = torch.topk(logits[t], k)
        weights = torch.softmax(top.values, dim=-1)  # softmax over the kept logits only
        for w, e in zip(weights, top.indices):
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += w * (w2[e] @ (F.silu(gate) * up))
    return out


def make_experts(e=8, d=32, i=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = LocalExperts(e, d, i)
    with torch.no_grad():
        experts.w13.copy_(torch.randn(e, 2 * i, d, generator=gen) * d**-0.5)
        experts.w2.copy_(torch.randn(e, d, i, generator=gen) * i**-0.5)
    return experts


@pytest.mark.parametrize("n_tokens,k", [(1, 2), (5, 2), (37, 2), (16, 1), (9, 3)])
def test_grouped_compute_equals_per_token_loop(n_tokens, k):
    experts = make_experts()
    gen = torch.Generator().manual_seed(n_tokens)
    x = torch.randn(n_tokens, 32, generator=gen)
    logits = torch.randn(n_tokens, 8, generator=gen)
    weights, ids = top_k_gating(logits, k)
    got = experts(x, ids, weights)
    assert torch.allclose(got, naive_moe(x, logits, experts.w13, experts.w2, k), atol=1e-5)


def test_gate_weights_are_softmax_over_the_kept_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    weights, ids = top_k_gating(logits, 2)
    assert ids.tolist() == [[3, 0]]
    assert torch.allclose(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), dim=-1))


def test_no_token_is_dropped_when_every_token_picks_the_same_experts():
    experts = make_experts()
    x = torch.randn(64, 32)
    ids = torch.tensor([[5, 2]] * 64)
    weights = torch.full((64, 2), 0.5)
    routing = group_by_expert(ids, weights, 8)
    assert routing.counts == [0, 0, 64, 0, 0, 64, 0, 0]
    got = experts(x, ids, weights)
    expected = torch.zeros_like(x)
    for e in (5, 2):
        gate, up = F.linear(x, experts.w13[e]).chunk(2, dim=-1)
        expected += 0.5 * F.linear(F.silu(gate) * up, experts.w2[e])
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_fused_kernel_equals_the_grouped_one_whatever_the_routing():
    from mixserve.model.moe_kernels import zentorch_fused_moe_works

    if not zentorch_fused_moe_works(torch.float32):
        pytest.skip("zentorch (the amd extra) is not installed or unusable here")
    torch.manual_seed(3)
    grouped, fused = LocalExperts(8, 64, 96), LocalExperts(8, 64, 96)
    with torch.no_grad():
        grouped.w13.normal_(0, 0.1), grouped.w2.normal_(0, 0.1)
        fused.w13.copy_(grouped.w13), fused.w2.copy_(grouped.w2)
    grouped.pack_weights("torch")
    fused.pack_weights("zentorch")
    for tokens in (1, 3, 17, 64):
        x = torch.randn(tokens, 64)
        weights, ids = top_k_gating(torch.randn(tokens, 8), 2)
        ids[: tokens // 2] = torch.tensor([5, 2])  # skew: half the tokens on the same two experts
        want, got = grouped(x, ids, weights), fused(x, ids, weights)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_an_unknown_or_unavailable_moe_kernel_is_refused():
    from mixserve.model.moe_kernels import resolve_moe_kernel

    with pytest.raises(ValueError, match="unknown MoE kernel"):
        resolve_moe_kernel("fastest", torch.float32, "cpu")
    assert resolve_moe_kernel("torch", torch.float32, "cpu") == "torch"
    assert resolve_moe_kernel("auto", torch.float32, "meta") == "torch"  # fused kernels are for CPUs
    with pytest.raises(ValueError, match="zentorch"):
        resolve_moe_kernel("zentorch", torch.bfloat16, "cpu")  # its bf16 path fails the probe here
