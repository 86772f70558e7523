"""Tile encoders: the registry, the real-size architectures on the meta device, weights, preprocessing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from wsi_llava import plugins
from wsi_llava.errors import ModelError
from wsi_llava.features.tile import TileEncoder, build_tile_encoder, weights_sha256


def test_plugin_import_does_not_import_torch():
    code = (
        "import sys, wsi_llava.features.plugin, wsi_llava.slide_encoder.config, wsi_llava.slide_encoder.pooling;"
        "bad=[m for m in ('torch','timm','transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_builtins_are_registered_with_metadata():
    reg = plugins.tile_encoders()
    for name, dim in (("prov-gigapath", 1536), ("uni", 1024), ("demo-vit", 192)):
        assert name in reg
        assert reg[name].meta["embed_dim"] == dim
        assert reg[name].plugin == "wsi_llava.features.plugin"


def test_prov_gigapath_shape_on_meta_device():
    with torch.device("meta"):
        enc = build_tile_encoder("prov-gigapath")
        out = enc(torch.empty(2, 3, 224, 224))
    n = sum(p.numel() for p in enc.parameters())
    assert 1.12e9 < n < 1.15e9  # Prov-GigaPath's tile encoder has 1.13 B parameters
    assert out.shape == (2, 1536)
    assert enc.embed_dim == 1536 and enc.input_size == 224 and enc.resize_size == 256
    assert enc.encoder_id == "prov-gigapath:random-seed0" and not enc.trained
    blk = enc.model.blocks[0]
    assert len(enc.model.blocks) == 40 and blk.attn.num_heads == 24
    assert enc.model.patch_embed.proj.kernel_size == (16, 16)
    assert blk.mlp.fc1.out_features == 8192  # SwiGLU, mlp_ratio 5.33334


def test_uni_shape_on_meta_device():
    with torch.device("meta"):
        enc = build_tile_encoder("uni")
        out = enc(torch.empty(3, 3, 224, 224))
    n = sum(p.numel() for p in enc.parameters())
    assert 3.0e8 < n < 3.07e8
    assert out.shape == (3, 1024)
    assert len(enc.model.blocks) == 24


def test_unknown_name_lists_registered():
    with pytest.raises(ModelError, match="registered: .*demo-vit.*prov-gigapath.*uni"):
        build_tile_encoder("no-such-encoder")


def test_demo_vit_is_deterministic_and_encodes_tiles():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    a, b = build_tile_encoder("demo-vit"), build_tile_encoder("demo-vit")
    assert isinstance(a, TileEncoder) and a.encoder_id == "demo-vit:random-seed0"
    with torch.inference_mode():
        fa, fb = a.encode(tiles), b.encode(torch.from_numpy(tiles))
    assert fa.shape == (3, 192)
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa[0], fa[1])


def test_preprocess_resizes_crops_and_normalises():
    enc = TileEncoder(
        "probe",
        torch.nn.Flatten(),
        embed_dim=3 * 224 * 224,
        input_size=224,
        resize_size=256,
        encoder_id="probe:test",
        trained=False,
    )
    tiles = np.zeros((2, 512, 512, 3), np.uint8)
    tiles[..., 0], tiles[..., 1], tiles[..., 2] = 255, 128, 0
    x = enc.preprocess(tiles)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    want = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert torch.allclose(x.mean(dim=(0, 2, 3)), want, atol=1e-4)
    # 256-px tiles: no resize, exact centre crop of 224
    t = np.random.default_rng(1).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    y = enc.preprocess(t)
    ref = torch.from_numpy(t[:, 16:240, 16:240]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(y, (ref - enc.mean) / enc.std, atol=1e-6)
    with pytest.raises(ModelError, match="B, H, W, 3"):
        enc.preprocess(np.zeros((2, 256, 256), np.uint8))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_round_trip_with_prefix(tmp_path, fmt):
    src = build_tile_encoder("demo-vit")
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01)
    sd = {f"module.{k}": v.clone() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    enc = build_tile_encoder("demo-vit", weights=path)
    assert enc.trained and enc.weights_sha256 == weights_sha256(path)
    assert enc.encoder_id == f"demo-vit:sha256-{enc.weights_sha256[:16]}"
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-6)
        assert not torch.allclose(enc(x), build_tile_encoder("demo-vit")(x))


def test_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        build_tile_encoder("demo-vit", weights=tmp_path / "absent.pth")
    sd = build_tile_encoder("demo-vit").model.state_dict()
    sd.pop("blocks.0.attn.qkv.weight")
    sd["extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(
        ModelError, match=r"missing keys \(e\.g\. blocks\.0\.attn\.qkv\.weight\).*extra\.weight"
    ):
        build_tile_encoder("demo-vit", weights=bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read tile encoder weights"):
        build_tile_encoder("demo-vit", weights=junk)


def test_tile_encoder_state_dict_reloads_by_name(tmp_path):
    """A TileEncoder saved whole (keys ``model.*``, as a checkpoint saves a trained one) loads by name."""
    from safetensors.torch import save_file

    src = build_tile_encoder("demo-vit")
    with torch.no_grad():
        src.model.head_drop.p = 0.0
        for p in src.model.parameters():
            p.mul_(1.5)
    path = tmp_path / "tile_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert all(k.startswith("model.") for k in src.state_dict())
    enc = build_tile_encoder("demo-vit", weights=path)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-6)
