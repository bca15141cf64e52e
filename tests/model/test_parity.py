"""mixserve against transformers' MistralForCausalLM / MixtralForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch

from mixserve import LLM, SamplingParams
from mixserve.model.moe_kernels import zentorch_fused_moe_works
from mixserve.model.presets import preset
from mixserve.platform.demo_checkpoint import write_checkpoint

transformers = pytest.importorskip("transformers")

BASE = dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, max_position_embeddings=512)
CASES = {
    # name: (preset, overrides). Windows are far below prompt + output so the cache wraps many times.
    "mixtral-gqa-window": ("tiny-mixtral", dict(BASE, sliding_window=16)),
    "mixtral-mqa-window": ("tiny-mixtral", dict(BASE, n_kv_heads=1, sliding_window=24)),
    "mixtral-full-attention": ("tiny-mixtral", dict(BASE, sliding_window=None, n_layers=3)),
    "mistral-gqa-headdim": ("tiny-mistral", dict(BASE, head_dim=24, sliding_window=16)),  # 4*24 != 64
    "mistral-mqa-window": ("tiny-mistral", dict(BASE, n_kv_heads=1, sliding_window=10)),
}
PROMPT_LEN = 70
NEW_TOKENS = 64


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation: no cache, so nothing of the reference's own
    cache logic can agree with ours by accident."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), logits_to_keep=1).logits  # the LM head on the last row only
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


# Mixtral runs through both MoE kernels: the grouped oneDNN GEMMs and zentorch's fused layer.
KERNEL_CASES = [(case, "torch") for case in sorted(CASES)] + [
    pytest.param(case, "zentorch", marks=pytest.mark.skipif(
        not zentorch_fused_moe_works(torch.float32), reason="zentorch (the amd extra) is not installed or unusable here"))
    for case in sorted(CASES) if CASES[case][0] == "tiny-mixtral"
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("case", "moe_kernel"), KERNEL_CASES)
def test_prompt_logprobs_and_greedy_tokens_match_transformers(tmp_path, case, moe_kernel, seed):
    name, overrides = CASES[case]
    args = preset(name, **overrides)
    write_checkpoint(tmp_path, args, seed=seed)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(3, args.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()

    llm = LLM(tmp_path, max_model_len=256, max_num_batched_tokens=32, moe_kernel=moe_kernel)
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=True)
    )[0]

    with torch.no_grad():
        ref_logprobs = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    ours = torch.tensor([out.prompt_logprobs[j][prompt[j]] for j in range(1, PROMPT_LEN)])
    theirs = torch.tensor([ref_logprobs[j - 1, prompt[j]].item() for j in range(1, PROMPT_LEN)])
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()

    assert out.token_ids == reference_greedy(ref, prompt, NEW_TOKENS)
