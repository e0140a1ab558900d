"""Layer-input Hessians H = AᵀA/T for the reconstruction objective, against dense float64 oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.calibration import check_unfoldable, layer_hessian, layer_hessians
from engine.errors import CBSError


def _oracle(rows: list[np.ndarray]) -> np.ndarray:
    A = np.concatenate(rows).astype(np.float64)
    return A.T @ A / A.shape[0]


def test_linear_rows_are_every_leading_index():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    model = nn.Sequential(lin, nn.ReLU())
    batches = [torch.randn(2, 4, 5), torch.randn(3, 4, 5)]  # (batch, tokens, features)
    got = layer_hessians(model, [("0", lin)], batches)["0"]
    assert got.rows == 20
    np.testing.assert_allclose(got.hessian, _oracle([b.reshape(-1, 5).double().numpy() for b in batches]), rtol=1e-12)


def test_conv2d_unfolding_matches_explicit_patches():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, kernel_size=3, stride=2, padding=1, dilation=1, bias=False)
    x = torch.randn(2, 2, 7, 6)
    got = layer_hessians(conv, [("conv", conv)], [x])["conv"]
    # explicit patches, in the order of weight.reshape(out, -1): (channel, ky, kx)
    xp = np.pad(x.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = []
    for b in range(2):
        for oy in range(4):
            for ox in range(3):
                rows.append(xp[b, :, 2 * oy : 2 * oy + 3, 2 * ox : 2 * ox + 3].reshape(-1))
    np.testing.assert_allclose(got.hessian, _oracle([np.stack(rows)]), rtol=1e-12, atol=1e-14)
    assert got.rows == 24
    # and the objective it defines is the change of the layer's outputs: ‖A(v−w)‖²/T per output channel
    w = conv.weight.detach().double().reshape(4, -1).numpy()
    v = w * (np.arange(w.shape[1]) % 2)
    change = nn.functional.conv2d(x.double(), torch.from_numpy(v - w).reshape(conv.weight.shape), stride=2,
                                  padding=1)
    per_channel = (change ** 2).sum(dim=(0, 2, 3)).numpy() / got.rows
    quad = np.einsum("oi,ij,oj->o", v - w, got.hessian, v - w)
    np.testing.assert_allclose(quad, per_channel, rtol=1e-10)


def test_gpt2_conv1d_rows():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs; weight (4, 6)
    x = torch.randn(3, 5, 4)
    got = layer_hessian(conv1d, "c", conv1d, [x])
    np.testing.assert_allclose(got.hessian, _oracle([x.reshape(-1, 4).double().numpy()]), rtol=1e-12)
    assert check_unfoldable("c", conv1d) == 4


def test_sequential_stop_runs_only_the_prefix():
    calls = []
    first, second = nn.Linear(3, 3), nn.Linear(3, 2)
    tail = nn.Linear(2, 2)
    tail.register_forward_hook(lambda *a: calls.append("tail"))
    model = nn.Sequential(first, nn.ReLU(), second, tail)
    x = torch.randn(4, 3)
    h = layer_hessian(model, "2", second, [x])
    a = torch.relu(first(x)).detach().double().numpy()
    np.testing.assert_allclose(h.hessian, a.T @ a / 4, rtol=1e-12)
    assert calls == []  # the forward pass ended at the layer


def test_bad_layers_and_activations_are_one_clear_error():
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(CBSError, match="cannot be unfolded"):
        check_unfoldable("g", grouped)
    with pytest.raises(CBSError, match="is a Embedding.*--objective fisher"):
        check_unfoldable("e", nn.Embedding(5, 3))
    lin = nn.Linear(3, 2)
    with pytest.raises(CBSError, match="not finite"):
        layer_hessians(lin, [("l", lin)], [torch.tensor([[1.0, float("nan"), 0.0]])])
    unused = nn.Linear(3, 3)
    got = layer_hessians(nn.Sequential(lin), [("u", unused)], [torch.randn(2, 3)])
    with pytest.raises(CBSError, match="received no calibration inputs"):
        got["u"].hessian
