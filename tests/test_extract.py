"""Feature extraction into the cache: real tiles from generated pyramids and the real H&E slide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kits.slides import write_pyramid
from skimage import data

from wsi_llava.errors import Cancelled
from wsi_llava.features.cache import FeatureCache
from wsi_llava.features.extract import cache_key_for, extract_features
from wsi_llava.features.tile import build_tile_encoder
from wsi_llava.progress import CancelToken
from wsi_llava.slide import open_slide
from wsi_llava.slide.tiling import make_tile_grid, read_tiles
from wsi_llava.slide_encoder.slide_encoder import SlideEncoder, SlideEncoderConfig


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 1024x768 three-level pyramid with real IHC texture, 0.5 µm/px (environment.md §2.1)."""
    img = np.ascontiguousarray(np.tile(data.immunohistochemistry(), (2, 2, 1))[:768, :1024])
    return write_pyramid(tmp_path_factory.mktemp("slides") / "ihc.tif", img, 0.5, compression="zlib")


@pytest.fixture(scope="module")
def encoder():
    return build_tile_encoder("demo-vit")


def _counting(enc):
    calls = []
    handle = enc.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    return calls, handle


def test_extract_then_cache_hit(pyramid, encoder, cache_dir):
    cache = FeatureCache(cache_dir)
    with open_slide(pyramid) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=128, min_tissue=0)
        assert len(grid) == 48
        seen = []
        calls, handle = _counting(encoder)
        try:
            feats = extract_features(
                reader, grid, encoder, cache, batch_size=8, progress=lambda d, t, m: seen.append((d, t, m))
            )
            assert sum(calls) == 48 and len(calls) == 6
            calls.clear()
            again = extract_features(reader, grid, encoder, cache, batch_size=8)
            assert calls == []  # served from the cache: the encoder never ran
        finally:
            handle.remove()
        assert feats.features.shape == (48, 192) and feats.features.dtype == np.float16
        assert np.array_equal(feats.coords, grid.coords)
        assert np.array_equal(again.features, feats.features)
        assert seen[0] == (0, 48, "extracting features") and seen[-1] == (48, 48, "extracting features")
        assert feats.attrs["tile_size_level0"] == 128 and feats.attrs["slide_path"] == str(pyramid)
        assert feats.attrs["trained"] is False and feats.key.encoder_id == "demo-vit:random-seed0"
        # the cached rows are the encoder's output on the grid's tiles
        idx = np.array([0, 13, 47])
        with torch.inference_mode():
            direct = encoder.encode(read_tiles(reader, grid, idx)).numpy()
        assert np.allclose(feats.features[idx].astype(np.float32), direct, atol=2e-2, rtol=1e-2)


def test_other_encoder_or_tiling_misses(pyramid, encoder, cache_dir, tmp_path):
    cache = FeatureCache(cache_dir)
    with open_slide(pyramid) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=128, min_tissue=0)
        first = extract_features(reader, grid, encoder, cache, batch_size=16)
        weights = tmp_path / "demo.pth"
        torch.save(encoder.model.state_dict(), weights)
        other = build_tile_encoder("demo-vit", weights=weights)
        assert cache_key_for(reader, grid, other) != cache_key_for(reader, grid, encoder)
        calls, handle = _counting(other)
        try:
            second = extract_features(reader, grid, other, cache, batch_size=16)
        finally:
            handle.remove()
        assert sum(calls) == 48 and second.path != first.path
        grid64 = make_tile_grid(reader, target_mpp=0.5, tile_size=64, min_tissue=0)
        calls, handle = _counting(encoder)
        try:
            third = extract_features(reader, grid64, encoder, cache, batch_size=64)
        finally:
            handle.remove()
        assert sum(calls) == len(grid64) == 192 and third.features.shape == (192, 192)
        assert len(cache.list()) == 3


def test_cancel_midway_leaves_nothing(pyramid, encoder, cache_dir):
    cache = FeatureCache(cache_dir)
    token = CancelToken()

    def progress(done, total, msg):
        if done >= 16:
            token.cancel()

    with open_slide(pyramid) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=128, min_tissue=0)
        with pytest.raises(Cancelled):
            extract_features(reader, grid, encoder, cache, batch_size=8, progress=progress, cancel=token)
        assert cache.get(cache_key_for(reader, grid, encoder)) is None
    assert [p for p in cache_dir.iterdir() if p.name != ".locks"] == []  # lock files stay


def test_crash_midway_leaves_nothing(pyramid, encoder, cache_dir):
    cache = FeatureCache(cache_dir)
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")

    handle = encoder.register_forward_pre_hook(explode)
    try:
        with open_slide(pyramid) as reader:
            grid = make_tile_grid(reader, target_mpp=0.5, tile_size=128, min_tissue=0)
            with pytest.raises(RuntimeError, match="simulated crash"):
                extract_features(reader, grid, encoder, cache, batch_size=8)
            assert cache.get(cache_key_for(reader, grid, encoder)) is None
    finally:
        handle.remove()
    assert [p for p in cache_dir.iterdir() if p.name != ".locks"] == [] and cache.list() == []


def test_real_slide_to_visual_tokens(cmu_svs, encoder, cache_dir):
    cache = FeatureCache(cache_dir)
    with open_slide(cmu_svs) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256)
        feats = extract_features(reader, grid, encoder, cache, batch_size=32)
    assert 20 < feats.n_tiles == len(grid) < 120
    assert np.isfinite(feats.features.astype(np.float32)).all()
    torch.manual_seed(0)
    slide_enc = SlideEncoder(SlideEncoderConfig.demo(in_dim=192)).eval()
    with torch.inference_mode():
        tokens = slide_enc(
            torch.from_numpy(feats.features.astype(np.float32)),
            torch.from_numpy(feats.coords.astype(np.int64)),
            grid.tile_size_level0,
        )
    assert tokens.shape == (576, 192) and torch.isfinite(tokens).all()
