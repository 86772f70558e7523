"""The WSI-LLaVA pooling: adaptive average pooling of the tile-token sequence to 576 bins, and its bins.

``adaptive_avg_pool1d`` averages contiguous runs of the (row-major) tile sequence; bin ``i`` covers tiles
``floor(i*N/out) .. ceil((i+1)*N/out) - 1``, which is what :func:`pool_bins` returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def pool_tokens(x: torch.Tensor, n_tokens: int = 576) -> torch.Tensor:
    """``(N, D)`` or ``(B, N, D)`` tokens → ``(n_tokens, D)`` / ``(B, n_tokens, D)`` by adaptive average pooling.

    When ``N < n_tokens`` tokens repeat, exactly as ``torch.nn.functional.adaptive_avg_pool1d`` does. With
    gradients the same bins are summed with ``index_add`` instead: PyTorch's CUDA backward of adaptive
    pooling fails for long sequences (thousands of tiles into 576 bins).
    """
    import torch
    import torch.nn.functional as F

    if x.dim() not in (2, 3) or x.shape[-2] < 1:
        raise ValueError(f"pool_tokens expects (N, D) or (B, N, D) with N >= 1, got {tuple(x.shape)}")
    batched = x.dim() == 3
    xb = x if batched else x.unsqueeze(0)
    if torch.is_grad_enabled() and xb.requires_grad:
        n = xb.shape[1]
        bins = pool_bins(n, n_tokens)
        lens = bins[:, 1] - bins[:, 0]
        starts = np.repeat(bins[:, 0] - (np.cumsum(lens) - lens), lens)
        tok = torch.from_numpy(np.arange(int(lens.sum())) + starts).to(xb.device)
        dst = torch.from_numpy(np.repeat(np.arange(n_tokens), lens)).to(xb.device)
        w = torch.from_numpy(np.repeat(1.0 / lens, lens)).to(device=xb.device, dtype=xb.dtype)
        out = xb.new_zeros(xb.shape[0], n_tokens, xb.shape[2]).index_add(1, dst, xb[:, tok] * w[:, None])
    else:
        out = F.adaptive_avg_pool1d(xb.transpose(1, 2), n_tokens).transpose(1, 2)
    return out if batched else out.squeeze(0)


def pool_bins(n: int, n_tokens: int = 576) -> np.ndarray:
    """``(n_tokens, 2)`` int64 ``[start, end)`` tile index range of each bin, as PyTorch's adaptive pooling."""
    if n < 1 or n_tokens < 1:
        raise ValueError(f"pool_bins needs n >= 1 and n_tokens >= 1, got n={n}, n_tokens={n_tokens}")
    i = np.arange(n_tokens, dtype=np.int64)
    start = (i * n) // n_tokens
    end = -((-(i + 1) * n) // n_tokens)  # ceil((i+1)*n/n_tokens) in exact integer arithmetic
    return np.stack([start, end], axis=1)
