"""The 576-token pooling: bins exactly as PyTorch's adaptive pooling, and scores spread back to tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_llava.slide_encoder.pooling import pool_bins, pool_tokens


@pytest.mark.parametrize("n", [1, 5, 575, 576, 577, 1000, 12345])
def test_pool_tokens_is_adaptive_avg_pool(n):
    x = torch.randn(n, 6, dtype=torch.float64)
    out = pool_tokens(x, 576)
    ref = F.adaptive_avg_pool1d(x.T.unsqueeze(0), 576)[0].T
    assert out.shape == (576, 6)
    assert torch.allclose(out, ref)
    assert torch.allclose(pool_tokens(x.unsqueeze(0).repeat(2, 1, 1))[1], ref)


@pytest.mark.parametrize("n", [3, 577, 5000])
def test_pool_tokens_gradient_path_matches_torch(n):
    x = torch.randn(2, n, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 576, 4, dtype=torch.float64)
    out = pool_tokens(x)  # index_add path (requires grad)
    (out * y).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = F.adaptive_avg_pool1d(x2.transpose(1, 2), 576).transpose(1, 2)
    (ref * y).sum().backward()
    assert torch.allclose(out, ref) and torch.allclose(x.grad, x2.grad)


@pytest.mark.parametrize(("n", "out"), [(1, 576), (5, 576), (577, 576), (1000, 576), (12345, 576), (10, 3)])
def test_pool_bins_reproduce_torch(n, out):
    bins = pool_bins(n, out)
    assert bins.shape == (out, 2)
    assert bins[0, 0] == 0 and bins[-1, 1] == n
    assert (bins[:, 1] > bins[:, 0]).all()
    x = torch.randn(n, 3, dtype=torch.float64)
    ref = F.adaptive_avg_pool1d(x.T.unsqueeze(0), out)[0].T
    mine = torch.stack([x[s:e].mean(0) for s, e in bins])
    assert torch.allclose(mine, ref)


def test_repeats_when_fewer_tiles_than_tokens():
    bins = pool_bins(5, 576)
    assert ((bins[:, 1] - bins[:, 0]) <= 2).all()  # a bin holds one tile, or two at a boundary
    assert np.bincount(bins[:, 0], minlength=5).tolist() == [116, 115, 115, 115, 115]
