"""``SlideEncoder``: LongNet → tile tokens → 576 pooled tokens → LayerNorm → zero-pad, and its config."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from wsi_llava.errors import ModelError
from wsi_llava.slide_encoder.pooling import pool_tokens
from wsi_llava.slide_encoder.slide_encoder import LONGNET_PREFIX, SlideEncoder, SlideEncoderConfig


def _cfg(**kw) -> SlideEncoderConfig:
    return SlideEncoderConfig.demo(in_dim=24, embed_dim=32, num_heads=4, depth=2, pad_to=48, **kw)


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    grid = torch.stack([xs.ravel(), ys.ravel()], 1)[:n]  # row-major tiles
    return torch.randn(n, 24, generator=g), grid * 256 + 1000


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_forward_shapes_norm_then_pad(n):
    torch.manual_seed(0)
    enc = SlideEncoder(_cfg()).eval()
    feats, coords = _inputs(n)
    with torch.inference_mode():
        out = enc(feats, coords, 256)
        tokens = enc.tile_tokens(feats, coords, 256)
    assert out.shape == (576, 48) and tokens.shape == (n, 32)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[:, 32:]) == 0  # zero-padded columns
    want = torch.nn.functional.layer_norm(pool_tokens(tokens, 576), (32,), eps=1e-6)  # norm weights are 1/0
    assert torch.allclose(out[:, :32], want, atol=1e-5)


def test_paper_shape_on_meta_device():
    cfg = SlideEncoderConfig.gigapath()
    assert cfg.segment_lengths == (1024, 5792, 32768, 185363, 1048576) and cfg.dilated_ratios == (
        1,
        2,
        4,
        8,
        16,
    )
    assert cfg.out_dim == 1024 and cfg.n_tokens == 576
    with torch.device("meta"):
        enc = SlideEncoder(cfg)
        out = enc(torch.empty(300, 1536), torch.zeros(300, 2, dtype=torch.int64), 256)
    assert out.shape == (576, 1024)
    assert sum(p.numel() for p in enc.longnet.parameters()) == 86_330_880
    keys = list(enc.state_dict())
    assert "longnet.encoder.layers.11.self_attn.q_proj.weight" in keys and "head.weight" in keys
    assert all(k.startswith((LONGNET_PREFIX, "head.")) for k in keys)


def test_identity_head_matches_no_head_and_trains():
    torch.manual_seed(0)
    with_head = SlideEncoder(_cfg(head="linear"))
    no_head = SlideEncoder(_cfg(head=None))
    no_head.longnet.load_state_dict(with_head.longnet.state_dict())
    feats, coords = _inputs(37)
    with torch.no_grad():
        assert torch.allclose(with_head(feats, coords, 256), no_head(feats, coords, 256), atol=1e-6)
    with_head.train()
    loss = with_head(feats, coords, 256).square().mean()
    loss.backward()
    for name in (
        "head.weight",
        "longnet.patch_embed.proj.weight",
        "longnet.encoder.layers.0.self_attn.q_proj.weight",
    ):
        grad = dict(with_head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = SlideEncoder(_cfg()).train()
    b = SlideEncoder(_cfg()).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    feats, coords = _inputs(50)
    a(feats, coords, 256).sum().backward()
    b(feats, coords, 256).sum().backward()
    ga = a.longnet.encoder.layers[0].ffn.fc1.weight.grad
    gb = b.longnet.encoder.layers[0].ffn.fc1.weight.grad
    assert torch.allclose(ga, gb, atol=1e-6)


def test_positions_matter_and_bad_input_is_reported():
    torch.manual_seed(0)
    enc = SlideEncoder(_cfg()).eval()
    feats, coords = _inputs(20)
    with torch.no_grad():
        assert not torch.allclose(enc(feats, coords, 256), enc(feats, coords + 256 * 7, 256))
    with pytest.raises(ModelError, match=r"\(N, 24\)"):
        enc(torch.zeros(5, 23), coords[:5], 256)
    with pytest.raises(ModelError, match="no tiles"):
        enc(torch.zeros(0, 24), torch.zeros(0, 2), 256)
    with pytest.raises(ModelError, match="tile_size_level0"):
        enc(feats, coords, 0)


def test_config_validation_and_json_round_trip():
    cfg = SlideEncoderConfig.demo()
    assert SlideEncoderConfig(**cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ValidationError, match="divisible by num_heads"):
        SlideEncoderConfig(embed_dim=100, num_heads=16)
    with pytest.raises(ValidationError, match="equal length"):
        SlideEncoderConfig(segment_lengths=(8, 16), dilated_ratios=(1,))
    with pytest.raises(ValidationError, match="pad_to"):
        SlideEncoderConfig(pad_to=512)
