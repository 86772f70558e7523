"""Tile encoders from timm hub folders in the layouts Prov-GigaPath, UNI and Virchow publish.

The folders are written at test time with timm itself (config.json + pytorch_model.bin / model.safetensors);
the encoder must be built by timm's local-folder loading, carry the folder's preprocessing, produce what
the plain timm model produces, and name what is wrong with a broken folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kits.parts import (
    make_gigapath_folder,
    make_slide_encoder_pth,
    make_timm_folder,
    make_uni_folder,
    make_virchow_folder,
    put_in_hub_cache,
)

from wsi_llava.errors import ModelError
from wsi_llava.features.tile import build_tile_encoder_from_folder
from wsi_llava.features.timm_hub import inspect_folder


def _tiles(n: int = 3, size: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _timm_reference(folder, tiles: np.ndarray, **create) -> torch.Tensor:
    """timm's own model and transforms (PIL path), as a user of the model card would run them."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f"local-dir:{folder}", pretrained=True, **create).eval()
    tf = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([tf(Image.fromarray(t)) for t in tiles])
    with torch.no_grad():
        return model(x)


def test_gigapath_folder_preprocessing_and_features(tmp_path):
    folder = make_gigapath_folder(tmp_path / "gp")
    info = inspect_folder(folder)
    assert info.architecture == "vit_giant_patch14_dinov2" and info.embed_dim == 96 and not info.token_output
    p = info.preprocessing
    assert (p.input_size, p.resize_size, p.interpolation) == (224, 256, "bicubic")  # Resize 256, crop 224
    enc = build_tile_encoder_from_folder(folder)
    assert enc.encoder_id.startswith("vit_giant_patch14_dinov2:sha256-") and enc.trained
    tiles = _tiles(size=256)
    with torch.no_grad():
        ours = enc.encode(tiles)
    ref = _timm_reference(folder, tiles)
    assert ours.shape == ref.shape == (3, 96)
    # 256-px tiles only get centre-cropped: the same pixels as timm's PIL pipeline, up to float rounding
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_uni_folder_bilinear_no_resize_and_resized_tiles(tmp_path):
    folder = make_uni_folder(tmp_path / "uni", weights="safetensors")
    enc = build_tile_encoder_from_folder(folder)
    assert (enc.input_size, enc.resize_size, enc.interpolation) == (224, 224, "bilinear")
    tiles = _tiles(size=320, seed=1)  # resized on the tensor path: close to timm's PIL resize
    with torch.no_grad():
        ours = enc.encode(tiles)
    ref = _timm_reference(folder, tiles)
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_virchow_folder_token_output_needs_its_model_card_arguments(tmp_path):
    folder = make_virchow_folder(tmp_path / "virchow")
    with pytest.raises(ModelError, match="tile-encoder-arg"):
        inspect_folder(folder)  # SwiGLU weights do not fit the plain MLP the config alone builds
    args = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    info = inspect_folder(folder, args)
    assert info.token_output and info.embed_dim == 192  # class token ⊕ mean patch token
    enc = build_tile_encoder_from_folder(folder, args)
    tiles = _tiles(size=224, seed=2)
    from timm.layers import SwiGLUPacked

    tokens = _timm_reference(folder, tiles, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    with torch.no_grad():
        assert torch.allclose(enc.encode(tiles), expected, atol=1e-4, rtol=1e-4)


# architectures with buffers no checkpoint holds: EVA-02's rotary embeddings, Swin's relative-position index
NON_PERSISTENT = {
    "eva02_tiny_patch14_224": {"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0},
    "swin_tiny_patch4_window7_224": {
        "img_size": 56,
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [1, 2],
        "num_classes": 0,
    },
}


@pytest.mark.parametrize("arch", ["gigapath", *NON_PERSISTENT])
def test_built_without_random_init_as_timm_builds_it(tmp_path, arch):
    """No random initialisation, yet the same weights, computed buffers and features as timm's own build."""
    import timm

    from wsi_llava.features.no_init import build_without_init
    from wsi_llava.features.timm_hub import build_model

    if arch == "gigapath":
        folder, size = make_gigapath_folder(tmp_path / arch), 224
    else:
        folder, size = make_timm_folder(tmp_path / arch, arch, NON_PERSISTENT[arch]), 56
    ref = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    lazy = build_without_init(lambda: timm.create_model(f"local-dir:{folder}", pretrained=True))
    assert lazy is not None  # not the fallback: built on the meta device, checkpoint tensors assigned
    ours = build_model(folder)
    for model in (lazy, ours):
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        expected = dict(ref.named_parameters()) | dict(ref.named_buffers())
        assert tensors.keys() == expected.keys()
        for name, t in tensors.items():
            assert t.device.type == "cpu" and t.dtype == expected[name].dtype, name
            assert torch.equal(t, expected[name]), name
        assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_a_parameter_the_checkpoint_lacks_is_initialised_as_timm_does(tmp_path):
    """A new classifier head (num_classes differs from the checkpoint's) keeps timm's random init: built normally."""
    import timm

    from wsi_llava.features.no_init import build_without_init
    from wsi_llava.features.timm_hub import build_model

    folder = make_gigapath_folder(tmp_path / "gp")
    assert (
        build_without_init(lambda: timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3))
        is None
    )
    torch.manual_seed(7)
    ref = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3).eval()
    torch.manual_seed(7)
    ours = build_model(folder, {"num_classes": 3})
    assert ours.head.weight.shape == (3, 96) and torch.equal(ours.head.weight, ref.head.weight)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_broken_folders_name_the_problem(tmp_path):
    gp = make_gigapath_folder(tmp_path / "gp")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        inspect_folder(empty)
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    with pytest.raises(ModelError, match="not a timm hub config.*llama"):
        inspect_folder(llm)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((gp / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        inspect_folder(noweights)
    data = (gp / "pytorch_model.bin").read_bytes()
    (gp / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="pytorch_model.bin.*(corrupt|truncated)"):
        inspect_folder(gp)
    other = make_gigapath_folder(tmp_path / "other", embed_dim=128)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_args"]["embed_dim"] = 96  # config says 96, weights are 128 wide
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="mis-shaped"):
        inspect_folder(other)


def test_hub_cache_files_are_keyed_by_their_blob_checksum(tmp_path, monkeypatch):
    import hashlib

    src = make_gigapath_folder(tmp_path / "src")
    make_slide_encoder_pth(src / "slide_encoder.pth", in_dim=96)
    cache = tmp_path / "hub"
    snap = put_in_hub_cache(cache, "prov-gigapath/prov-gigapath", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    enc = build_tile_encoder_from_folder(snap)
    sha = hashlib.sha256((src / "pytorch_model.bin").read_bytes()).hexdigest()
    assert enc.weights_sha256 == sha and enc.encoder_id.endswith(sha[:16])


def test_local_weights_checksum_is_remembered_across_processes(tmp_path, monkeypatch):
    import hashlib
    import subprocess
    import sys

    folder = make_gigapath_folder(tmp_path / "gp")
    monkeypatch.setenv("WSI_LLAVA_CACHE", str(tmp_path / "cache"))
    code = (
        "import sys; from pathlib import Path; from wsi_llava.features.tile import weights_sha256;"
        "print(weights_sha256(Path(sys.argv[1])))"
    )
    first = subprocess.run(
        [sys.executable, "-c", code, str(folder / "pytorch_model.bin")], capture_output=True, text=True
    )
    assert first.stdout.strip() == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    memo = json.loads((tmp_path / "cache" / "checksums.json").read_text())
    assert memo[str((folder / "pytorch_model.bin").resolve())]["sha256"] == first.stdout.strip()
    # a changed file (new size/mtime) is hashed again, not served from the memo
    (folder / "pytorch_model.bin").write_bytes(b"changed")
    again = subprocess.run(
        [sys.executable, "-c", code, str(folder / "pytorch_model.bin")], capture_output=True, text=True
    )
    assert again.stdout.strip() == hashlib.sha256(b"changed").hexdigest()
