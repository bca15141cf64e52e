"""Fused MoE kernels from libraries, behind a probe, for the in-process experts.

Why: on CPUs, decode through a Mixtral layer is a dozen small GEMMs (two per active expert)
that each stream their weights from memory; separate oneDNN calls reach 19-27 GB/s here against
~31 GB/s of read bandwidth. AMD's zentorch (the ZenDNN plugin for PyTorch, the optional `amd`
extra) runs the whole layer (top-k dispatch, SwiGLU, weighted combine) as one fused kernel:
measured alone on the 2-core EPYC CI machine in float32 for small-mixtral's 1024 -> 2816
experts, 9.1 ms a layer against 11.7 (8 tokens) and 12.4 (32 tokens) for the grouped oneDNN
path, equal at 512, results within 5e-6. It is the kernel vLLM's CPU build uses when zentorch
is present. Inside the engine, interleaved A/B runs (the two engines loaded side by side, runs
alternating, so the VM's noise hits both) gave on tiny-mixtral +65% 512-token prefill and +7 /
+38 / +12% decode at 1 / 8 / 32 sequences, and on small-mixtral +62% prefill and +13 / -5 / +11%
(earlier sequential runs had suggested slower prefill: that was the machine's noise). So
EngineConfig.moe_kernel 'auto', the default, takes it whenever it works here.

It also wins on Intel: on a 2-core Xeon (AVX-512, AMX) CI machine, 8 layers of small-mixtral
experts cycled (2.2 GB, so the weights stream from memory and not from its 480 MiB L3, which
made single-layer timings favour the grouped path), float32, ms a layer at 1 / 2 / 8 / 32
tokens: grouped 3.42 / 6.71 / 11.6 / 15.4, zentorch 2.73 / 5.02 / 9.53 / 14.1 (vLLM's own CPU
kernel, same method: 2.35 / 4.61 / 9.74 / 13.2); in the engine, interleaved, decode at 1 / 8 /
32 sequences 24.0 / 73.0 / 210 tok/s grouped against 28.6 / 84.8 / 219 with zentorch.

bfloat16 stays on the grouped path: zentorch's bfloat16 kernel rewrites the expert weight
tensors in place on its first call (into a blocked layout it tracks), so those tensors mean
nothing to any other code afterwards (the probe's reference, add_experts, a one-expert detour).

The library is optional and probed once: it must import, match the grouped reference on a
small problem, and support the dtype; otherwise the grouped path runs. Shape legend: T tokens,
D model dim, I expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

log = logging.getLogger(__name__)
MOE_KERNELS = ("auto", "torch", "zentorch")


@lru_cache(maxsize=None)
def zentorch_fused_moe_works(dtype: torch.dtype) -> bool:
    """True if zentorch is installed, works with this torch, and matches the reference."""
    try:
        import zentorch  # noqa: F401 - registers torch.ops.zentorch
    except Exception:  # noqa: BLE001 - not installed, or built for another torch
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        e, d, i, t = 4, 32, 48, 5
        w13 = torch.randn(e, 2 * i, d, generator=gen).to(dtype)
        w2 = torch.randn(e, d, i, generator=gen).to(dtype)
        x = torch.randn(t, d, generator=gen).to(dtype)
        ids = torch.randint(0, e, (t, 2), generator=gen)
        ids[:, 1] = (ids[:, 0] + 1) % e
        weights = torch.rand(t, 2, generator=gen)
        got = fused_moe(x, w13, w2, ids, weights)
        want = torch.zeros(t, d)
        for k in range(2):
            gate, up = torch.einsum("td,tod->to", x.float(), w13[ids[:, k]].float()).chunk(2, dim=-1)
            want += weights[:, k, None] * torch.einsum("ti,tdi->td", torch.nn.functional.silu(gate) * up, w2[ids[:, k]].float())
        return torch.allclose(got.float(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)
    except Exception:  # noqa: BLE001 - any failure means: use the grouped path
        log.warning("zentorch is installed but its fused MoE failed the probe; using the grouped kernel", exc_info=True)
        return False


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I], expert_ids [T, K],
    weights [T, K] -> [T, D] = sum_k weights[:, k] * SwiGLU_{expert_ids[:, k]}(x)."""
    out = torch.empty_like(x)
    torch.ops.zentorch.zentorch_fused_moe(
        out, x.contiguous(), w13, w2, None, None, weights.float().contiguous(),
        expert_ids.to(torch.int32).contiguous(), False, "silu",
    )
    return out


def resolve_moe_kernel(kernel: str, dtype: torch.dtype, device: str | torch.device) -> str:
    """'zentorch' or 'torch' for a requested kernel ('auto' takes zentorch when it works here)."""
    if kernel not in MOE_KERNELS:
        raise ValueError(f"unknown MoE kernel {kernel!r}; choose one of {', '.join(MOE_KERNELS)}")
    if kernel == "torch" or torch.device(device).type != "cpu":
        return "torch"
    works = zentorch_fused_moe_works(dtype)
    if kernel == "zentorch" and not works:
        raise ValueError("moe_kernel 'zentorch' was asked for but zentorch is not installed for this torch "
                         "(pip install 'mixserve[amd]') or failed its check")
    return "zentorch" if works else "torch"
