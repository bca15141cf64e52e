"""Prepacked weights give the same products as F.linear, on the oneDNN path and the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixserve.model.packed import PackedWeight, onednn_linear_works, pack_model


@pytest.mark.parametrize("out_features", [8, 384, 5632, 32002])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_packed_weight_equals_linear(out_features, rows):
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, 48, generator=gen)
    x = torch.randn(rows, 48, generator=gen)
    packed = PackedWeight(weight)
    assert torch.allclose(packed(x), F.linear(x, weight), atol=1e-4)
    assert torch.allclose(packed(x[:, :].T.contiguous().T), F.linear(x, weight), atol=1e-4)  # strided input


def test_this_cpu_uses_the_onednn_path():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert onednn_linear_works(torch.float32)
    assert PackedWeight(torch.randn(512, 8)).onednn
    assert not PackedWeight(torch.randn(8, 512)).onednn  # narrow outputs stay on F.linear


def test_pack_model_replaces_bias_free_linears_only():
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=True))
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        pack_model(model)
        assert type(model[0]).__name__ == "PackedLinear" and isinstance(model[1], nn.Linear)
        assert torch.allclose(model(x), expected, atol=1e-5)
