"""The batched dilated attention's edge cases against the naive per-segment, per-head reference."""

from __future__ import annotations

import pytest
import torch
from kits.attention import naive_dilated as _naive_dilated
from kits.attention import random_qkv as _qkv

from wsi_llava.slide_encoder.longnet import _pieces, dilated_attention


def test_pieces_split_off_a_partial_last_segment():
    assert _pieces(100, 32, 4) == [(0, 3, 32, 8, 0), (96, 1, 4, 1, 7)]  # 7 zero keys added analytically
    assert _pieces(100, 1000, 8) == [(0, 1, 100, 13, 0)]  # one segment: padded to 13 groups of 8
    assert _pieces(64, 16, 1) == [(0, 4, 16, 16, 0)]


@pytest.mark.parametrize(
    ("n", "h", "segments", "ratios"),
    [
        (23, 5, [5, 9], [2, 4]),  # segments not a multiple of the ratio; 5 heads: partial head groups
        (61, 16, [7, 13, 100, 1000], [1, 8, 16, 4]),  # 16 heads as in the paper shape, padded tails
        (9, 2, [3, 4, 64], [1, 4, 8]),  # fewer heads than the ratio: some offsets unused
        (33, 4, [8, 16], [2, 2]),
    ],
)
def test_edge_cases_match_naive_reference(n, h, segments, ratios):
    q, k, v = _qkv(2, n, h, 4, seed=n + h)
    out = dilated_attention(q, k, v, segments, ratios)
    assert torch.allclose(out, _naive_dilated(q, k, v, segments, ratios), atol=1e-10)


def test_gradient_with_padded_segments_matches_naive():
    q, k, v = _qkv(1, 23, 5, 4, seed=7, grad=True)
    dilated_attention(q, k, v, [5, 9], [2, 4]).square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    _naive_dilated(q2, k2, v2, [5, 9], [2, 4]).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-8)


def test_bf16_fused_path_within_bf16_tolerance():
    q, k, v = _qkv(1, 300, 8, 16, seed=11)
    ref = _naive_dilated(q, k, v, [64, 128, 1000], [1, 2, 8]).float()
    with torch.inference_mode():
        out = dilated_attention(*(t.bfloat16() for t in (q, k, v)), [64, 128, 1000], [1, 2, 8])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
