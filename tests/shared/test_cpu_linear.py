"""The oneDNN prepacked-linear transform: same results as nn.Linear, every Linear replaced."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.cpu_linear import OneDNNLinear, onednn_usable, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_usable(torch.device("cpu"), torch.float32),
                                reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 40), (7, 40), (3, 5, 40), (300, 40)])
def test_matches_nn_linear_for_any_leading_shape(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(40, 77, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got = OneDNNLinear(lin)(x)
        want = lin(x)
    assert got.shape == want.shape == (*shape[:-1], 77)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_is_read_correctly() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(32, 16)
    x = torch.randn(32, 10).t()  # [10, 32], transposed strides
    with torch.inference_mode():
        torch.testing.assert_close(OneDNNLinear(lin)(x), lin(x), rtol=1e-5, atol=1e-5)


def test_transform_replaces_every_linear_and_keeps_other_modules() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        want = model(x)
        use_onednn_linears(model)
        got = model(x)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, OneDNNLinear) for m in model.modules()) == 2
    assert isinstance(model[1], nn.ReLU) and isinstance(model[2][1], nn.LayerNorm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_usable_only_on_cpu_float32() -> None:
    assert not onednn_usable(torch.device("cpu"), torch.bfloat16)
    assert not onednn_usable(torch.device("cuda"), torch.float32)
