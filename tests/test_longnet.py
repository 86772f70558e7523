"""LongNet dilated attention against naive references, positions, and Prov-GigaPath's key layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kits.attention import naive_dilated as _naive_dilated
from kits.attention import random_qkv as _qkv

from wsi_llava.errors import ModelError
from wsi_llava.slide_encoder.config import SlideEncoderConfig
from wsi_llava.slide_encoder.longnet import (
    LongNetViT,
    attention_with_lse,
    dilated_attention,
    load_gigapath_slide_encoder,
    sincos_2d,
)


def _full_attention(q, k, v):
    s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v)


def test_one_segment_ratio_one_is_full_attention():
    q, k, v = _qkv(2, 37, 4, 8)
    out = dilated_attention(q, k, v, [64], [1])
    assert torch.allclose(out, _full_attention(q, k, v), atol=1e-10)
    out2 = dilated_attention(q, k, v, [37, 1000], [1, 1])  # two identical full branches: same answer
    assert torch.allclose(out2, _full_attention(q, k, v), atol=1e-10)


@pytest.mark.parametrize(
    ("n", "h", "segments", "ratios"),
    [
        (23, 4, [8, 16, 32], [1, 2, 4]),
        (50, 6, [16, 40, 100, 1000], [1, 2, 4, 8]),  # 6 heads with ratio 4 and 8: padded head groups
        (7, 3, [4, 1024], [2, 16]),
    ],
)
def test_multi_branch_matches_naive_reference(n, h, segments, ratios):
    q, k, v = _qkv(2, n, h, 8, seed=n)
    out = dilated_attention(q, k, v, segments, ratios)
    ref = _naive_dilated(q, k, v, segments, ratios)
    assert torch.allclose(out, ref, atol=1e-10)


def test_fused_and_math_lse_agree():
    q, k, v = (t.float().transpose(1, 2).contiguous() for t in _qkv(3, 29, 4, 16, seed=3))
    with torch.no_grad():
        fused = attention_with_lse(q, k, v)
    qg = q.clone().requires_grad_(True)
    math_out, math_lse = attention_with_lse(qg, k, v)  # grad path: exact math
    s = (q @ k.transpose(-1, -2)) / 4.0
    assert torch.allclose(math_lse, s.logsumexp(-1), atol=1e-5)
    assert torch.allclose(fused[0], math_out.detach(), atol=1e-5)
    assert torch.allclose(fused[1], math_lse.detach(), atol=1e-5)


def test_gradient_flows_through_branches_and_weights():
    q, k, v = _qkv(1, 19, 4, 8, seed=5, grad=True)
    out = dilated_attention(q, k, v, [4, 8, 32], [1, 2, 4])
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # the gradient matches the naive reference's autograd (weights are differentiated too)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    _naive_dilated(q2, k2, v2, [4, 8, 32], [1, 2, 4]).square().sum().backward()
    assert torch.allclose(q.grad, q2.grad, atol=1e-8) and torch.allclose(k.grad, k2.grad, atol=1e-8)


@pytest.mark.parametrize("chunk", [1 << 26, 64])  # one chunk, and many (rows of 2 queries)
def test_attention_backward_is_exact_for_output_and_lse(monkeypatch, chunk):
    """The chunked backward differentiates both outputs: against autograd of the plain formula."""
    import wsi_llava.slide_encoder.longnet as ln

    monkeypatch.setattr(ln, "_MATH_CHUNK_ELEMS", chunk)
    q, k, v = (t.transpose(1, 2).contiguous().requires_grad_(True) for t in _qkv(2, 31, 3, 8, seed=11))
    w_out, w_lse = torch.randn(q.shape, dtype=q.dtype), torch.randn(q.shape[:-1], dtype=q.dtype)
    out, lse = attention_with_lse(q, k, v)
    got = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    ref_lse = s.logsumexp(-1)
    ref = torch.autograd.grad(((s.softmax(-1) @ v) * w_out).sum() + (ref_lse * w_lse).sum(), (q, k, v))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b, c: attention_with_lse(a, b, c), (q, k, v))


def _gigapath_table(dim: int, grid: int) -> np.ndarray:
    """Prov-GigaPath's table: meshgrid(w, h); first half encodes grid[0] (= column), second grid[1] (= row)."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)


def test_positions_equal_gigapath_table_rows():
    grid, dim = 12, 32
    table = _gigapath_table(dim, grid)
    gx, gy = np.meshgrid(np.arange(grid), np.arange(grid))
    cells = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))
    ours = sincos_2d(cells, dim).numpy()
    rows = (cells[:, 0] * grid + cells[:, 1]).numpy()  # coords_to_pos: x * ngrids + y
    assert np.allclose(ours, table[rows], atol=1e-6)


def _tiny_cfg(**kw) -> SlideEncoderConfig:
    base = dict(in_dim=24, embed_dim=32, depth=2, num_heads=4, segment_lengths=(4, 16), dilated_ratios=(1, 2))
    base.update(kw)
    return SlideEncoderConfig(**base)


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_tiny_longnet_forward(n):
    torch.manual_seed(0)
    model = LongNetViT(_tiny_cfg()).eval()
    feats = torch.randn(1, n, 24)
    coords = torch.randint(0, 200, (1, n, 2)) * 256
    with torch.inference_mode():
        out = model(feats, coords, 256)
    assert out.shape == (1, n + 1, 32)
    assert torch.isfinite(out).all()


def _gigapath_key_shapes(in_dim: int, d: int, ffn: int, depth: int) -> dict[str, tuple[int, ...]]:
    """The parameter names of Prov-GigaPath's LongNetViT + torchscale encoder, written out by hand."""
    keys: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "patch_embed.proj.weight": (d, in_dim),
        "patch_embed.proj.bias": (d,),
        "encoder.layer_norm.weight": (d,),
        "encoder.layer_norm.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[p + f"self_attn.{proj}.weight"] = (d, d)
            keys[p + f"self_attn.{proj}.bias"] = (d,)
        for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
            keys[p + ln + ".weight"] = (d,)
            keys[p + ln + ".bias"] = (d,)
        keys[p + "ffn.fc1.weight"], keys[p + "ffn.fc1.bias"] = (ffn, d), (ffn,)
        keys[p + "ffn.fc2.weight"], keys[p + "ffn.fc2.bias"] = (d, ffn), (d,)
        keys[p + "ffn.ffn_layernorm.weight"], keys[p + "ffn.ffn_layernorm.bias"] = (ffn,), (ffn,)
    return keys


def test_gigapath_layout_matches_paper_shape():
    with torch.device("meta"):
        model = LongNetViT(SlideEncoderConfig.gigapath())
    want = _gigapath_key_shapes(1536, 768, 3072, 12)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(math.prod(s) for s in want.values()) == 86_330_880


@pytest.mark.parametrize("wrap", ["model", "module-prefix"])
def test_load_gigapath_checkpoint_strictly(tmp_path, wrap):
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in _gigapath_key_shapes(24, 32, 128, 2).items()}
    sd_file = dict(sd, pos_embed=torch.zeros(1, 5, 32))  # a persisted sin-cos table is ignored
    path = tmp_path / "slide_encoder.pth"
    if wrap == "model":
        torch.save({"model": sd_file}, path)
    else:
        torch.save({f"module.{k}": v for k, v in sd_file.items()}, path)
    model = load_gigapath_slide_encoder(path, LongNetViT(_tiny_cfg()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    inferred = load_gigapath_slide_encoder(path)  # widths and depth read from the file
    assert inferred.cfg.in_dim == 24 and inferred.cfg.depth == 2 and inferred.cfg.ffn_dim == 128


def test_load_gigapath_mismatch_names_keys(tmp_path):
    sd = {k: torch.zeros(s) for k, s in _gigapath_key_shapes(24, 32, 128, 2).items()}
    sd.pop("encoder.layers.1.ffn.fc2.bias")
    sd["head.weight"] = torch.zeros(2, 32)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(
        ModelError, match=r"missing keys \(e\.g\. encoder\.layers\.1\.ffn\.fc2\.bias\).*head\.weight"
    ):
        load_gigapath_slide_encoder(path, LongNetViT(_tiny_cfg()))
    with pytest.raises(ModelError, match="not found"):
        load_gigapath_slide_encoder(tmp_path / "absent.pth")
