"""The fast featurization path on CPU: raw JPEG tile streams, the overlapped pipeline, and its fallbacks."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsi_llava.features import fast as fast_mod
from wsi_llava.features.cache import FeatureCache
from wsi_llava.features.extract import extract_features
from wsi_llava.features.fast import FastTileEncoder, fast_encoder
from wsi_llava.features.tile import build_tile_encoder
from wsi_llava.progress import Cancelled, CancelToken
from wsi_llava.slide.jpeg_tiles import check_plan, load_tiles, plan_batch, plan_jpeg_tiles, splice
from wsi_llava.slide.tiff_reader import TiffReader
from wsi_llava.slide.tiling import make_tile_grid, read_tiles
from wsi_llava.synth.tiff import write_pyramid


@pytest.fixture(scope="module")
def encoder():
    return build_tile_encoder("demo-vit")


@pytest.fixture(scope="module")
def world_slide(world) -> Path:
    return sorted((world / "slides").glob("*.tif"))[0]


@pytest.fixture(scope="module")
def edge_slide(tmp_path_factory) -> Path:
    """A 900 x 700 px JPEG pyramid: its right and bottom 256-px tiles cross the image edge."""
    rng = np.random.default_rng(3)
    base = rng.integers(60, 200, size=(700, 900, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("edge") / "edge.tif"
    write_pyramid(path, 900, 700, lambda y0, y1: base[y0:y1], mpp=0.5, quality=85)
    return path


def _streams_equal_reader(reader: TiffReader, grid, idx: np.ndarray) -> None:
    plan = plan_jpeg_tiles(reader, grid)
    assert plan is not None
    decoded = load_tiles(plan, idx, "cpu").numpy()
    ref = read_tiles(reader, grid, idx)
    assert decoded.shape == ref.shape
    np.testing.assert_array_equal(decoded, ref)


def test_raw_jpeg_streams_decode_like_tifffile(world_slide):
    with TiffReader(world_slide) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and len(grid) == 64
        assert len(plan_batch(plan, np.arange(64)).tiles) == 64  # one whole TIFF tile per grid tile
        # out of order and with a gap: one pread per run of consecutive streams, results in request order
        idx = np.array([5, 3, 4, 40, 0, 63])
        _streams_equal_reader(reader, grid, idx)


def test_svs_shared_tables_and_rgb_colour_space(cmu_svs):
    """Aperio: abbreviated streams + JPEGTables, RGB JPEG data (an Adobe marker is spliced in)."""
    with TiffReader(cmu_svs) as reader:
        grid = make_tile_grid(reader, target_mpp=reader.mpp, tile_size=240, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None
        assert b"Adobe" in plan.header and len(plan.header) > 200  # tables spliced in
        assert len(grid) == 10 * 13  # 2220 x 2967 px: the last column and row cross the edge
        _streams_equal_reader(reader, grid, np.arange(len(grid))[::7])
        assert check_plan(reader, grid, plan, "cpu") is None
        # without the colour-space marker the decoder assumes YCbCr: check_plan must notice
        bad = type(plan)(**{**plan.__dict__, "header": b"\xff\xd8" + plan.header[2 + 16 :]})
        assert b"Adobe" not in bad.header
        reason = check_plan(reader, grid, bad, "cpu")
        assert reason is not None and "differ" in reason


def test_splice():
    tables = b"\xff\xd8TABLES\xff\xd9"
    header = b"\xff\xd8" + tables[2:-2]
    assert splice(header, b"\xff\xd8SCAN\xff\xd9") == b"\xff\xd8TABLESSCAN\xff\xd9"
    assert splice(b"\xff\xd8", b"\xff\xd8SCAN\xff\xd9") == b"\xff\xd8SCAN\xff\xd9"


def _extract_both(reader, grid, encoder, tmp_path, **fast_kw):
    ref = extract_features(reader, grid, encoder, FeatureCache(tmp_path / "ref"), fast=False, batch_size=16)
    fast = extract_features(
        reader, grid, encoder, FeatureCache(tmp_path / "fast"), fast=True, batch_size=24, **fast_kw
    )
    np.testing.assert_array_equal(ref.coords, fast.coords)
    f32 = fast.features.astype(np.float32)
    r32 = ref.features.astype(np.float32)
    assert np.isfinite(f32).all()
    rel = np.linalg.norm(f32 - r32) / np.linalg.norm(r32)
    assert rel < 2e-3, rel
    return ref, fast


def test_fast_extract_matches_reference(world_slide, encoder, tmp_path, caplog):
    with TiffReader(world_slide) as reader, caplog.at_level(logging.INFO, "wsi_llava"):
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256)
        assert len(grid) > 24  # several batches, the last one short
        _extract_both(reader, grid, encoder, tmp_path)
    assert any(
        "tiles from JPEG streams" in r.message and "through the reader" in r.message for r in caplog.records
    )
    assert any(f"{len(grid)} tiles from JPEG streams, 0 through" in r.message for r in caplog.records)


def test_fast_extract_mixes_edge_tiles(edge_slide, encoder, tmp_path):
    with TiffReader(edge_slide) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and len(grid) == 12  # 2 x 3 whole tiles, 6 cross the edge
        _streams_equal_reader(reader, grid, np.arange(len(grid)))
        _extract_both(reader, grid, encoder, tmp_path)


def test_fallback_non_jpeg_and_misaligned(tmp_path, encoder, world_slide, caplog):
    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, size=(512, 768, 3), dtype=np.uint8)
    path = tmp_path / "zlib.tif"
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        compression="zlib",
        photometric="rgb",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    with TiffReader(path) as reader, caplog.at_level(logging.INFO, "wsi_llava"):
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        assert plan_jpeg_tiles(reader, grid) is None
        _extract_both(reader, grid, encoder, tmp_path / "zlib")
    assert any("not JPEG" in r.message for r in caplog.records)
    with TiffReader(world_slide) as reader:  # 200-px tiles across the 256-px TIFF tiles: assembled
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=200)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and not plan.resize
        _streams_equal_reader(reader, grid, np.arange(len(grid)))
        _extract_both(reader, grid, encoder, tmp_path / "misaligned")


def test_compile_failure_falls_back_to_eager(encoder, monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("inductor exploded")

    monkeypatch.setattr(fast_mod, "_compiled_copy", lambda model: Broken())
    fenc = FastTileEncoder(encoder, "cpu", compile=True)
    assert fenc.compiled
    tiles = np.random.default_rng(0).integers(0, 255, size=(3, 112, 112, 3), dtype=np.uint8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "wsi_llava"):
        out = fenc(tiles)
        ref = encoder.encode(tiles)
    assert not fenc.compiled
    torch.testing.assert_close(out, ref)
    assert any("running eagerly" in r.message for r in caplog.records)


def test_fast_encoder_is_cached_and_leaves_encoder_alone(encoder):
    a = fast_encoder(encoder, "cpu")
    assert fast_encoder(encoder, "cpu") is a and not a.compiled  # no compilation on CPU by default
    keys = set(encoder.state_dict())
    fenc = FastTileEncoder(encoder, "cpu", compile=False, bf16_weights=True)
    assert set(encoder.state_dict()) == keys
    assert next(encoder.parameters()).dtype == torch.float32
    assert next(fenc._model.parameters()).dtype == torch.bfloat16


def test_fast_extract_cancel_leaves_no_cache(world_slide, encoder, tmp_path):
    token = CancelToken()

    def progress(done, total, message):
        if done > 0:
            token.cancel()

    cache = FeatureCache(tmp_path / "c")
    with TiffReader(world_slide) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256)
        with pytest.raises(Cancelled):
            extract_features(
                reader, grid, encoder, cache, fast=True, batch_size=8, progress=progress, cancel=token
            )
    assert cache.list() == []
    assert not any(".tmp-" in p.name for p in cache.root.iterdir())  # no temporary group left


def test_jpeg_tiles_module_is_torch_free():
    code = "import sys, wsi_llava.slide.jpeg_tiles; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class _StandIn(torch.nn.Module):
    """Plays the compiled copy: the eager model's maths, gated and counted, to test the background swap."""

    def __init__(self, model, gate=None, fail=False):
        super().__init__()
        self.model, self.gate, self.fail, self.calls = model, gate, fail, 0

    def forward(self, x):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls += 1
        if self.fail:
            raise RuntimeError("inductor exploded in the background")
        return self.model(x)


def test_background_compile_runs_eagerly_until_the_copy_is_ready(encoder, monkeypatch):
    import threading

    gate = threading.Event()
    made = []
    monkeypatch.setattr(
        fast_mod, "_compiled_copy", lambda model: made.append(_StandIn(model, gate)) or made[-1]
    )
    fenc = FastTileEncoder(encoder, "cpu", compile=True, background=True)
    tiles = np.random.default_rng(1).integers(0, 255, size=(4, 112, 112, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = encoder.encode(tiles)
        first = fenc(tiles)  # starts the thread, which blocks in the stand-in: this batch runs eagerly
        assert fenc.compiled and not fenc.ready and made[0].calls == 0
        gate.set()
        assert fenc.wait(10) and fenc.ready
        assert made[0].calls == 1  # the warm-up run on the private sample
        second = fenc(tiles)
    assert made[0].calls == 2  # later batches go through the compiled copy
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)


def test_background_compile_failure_stays_eager(encoder, monkeypatch, caplog):
    monkeypatch.setattr(fast_mod, "_compiled_copy", lambda model: _StandIn(model, fail=True))
    fenc = FastTileEncoder(encoder, "cpu", compile=True, background=True)
    tiles = np.random.default_rng(2).integers(0, 255, size=(3, 112, 112, 3), dtype=np.uint8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "wsi_llava"):
        fenc(tiles)
        assert fenc.wait(10)
        out = fenc(tiles)
        ref = encoder.encode(tiles)
    assert not fenc.compiled and fenc.ready
    torch.testing.assert_close(out, ref)
    assert any("in the background" in r.message for r in caplog.records)


class _Tracing(torch.nn.Module):
    """A compiled copy whose compiling is a real ``torch.fx`` trace, held open until the other thread
    has encoded a batch (or 3 s), as inductor traces while the first batches run eagerly."""

    def __init__(self, model, tracing, encoded) -> None:
        super().__init__()
        self.model, self.tracing, self.encoded = model, tracing, encoded

    def forward(self, x):
        tracing, encoded = self.tracing, self.encoded

        class Pattern(torch.nn.Module):
            def forward(self, y):
                tracing.set()
                encoded.wait(3)
                return y + 1

        if not tracing.is_set():
            torch.fx.symbolic_trace(Pattern())
        return self.model(x)


def test_an_eager_batch_beside_a_background_trace_is_run_again(encoder, monkeypatch):
    """torch.fx patches nn.Module.__call__ process-wide while it traces: a batch encoded meanwhile in
    another thread failed ("module is not installed as a submodule"); it now runs again after."""
    import threading

    tracing, encoded = threading.Event(), threading.Event()
    monkeypatch.setattr(fast_mod, "_compiled_copy", lambda model: _Tracing(model, tracing, encoded))
    fenc = FastTileEncoder(encoder, "cpu", compile=True, background=True)
    tiles = np.random.default_rng(3).integers(0, 255, size=(4, 112, 112, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = encoder.encode(tiles)
        first = fenc(tiles)  # starts the thread
        assert tracing.wait(10)  # the trace is open now
        second = fenc(tiles)
        encoded.set()
        assert fenc.wait(10) and fenc.ready and fenc.compiled
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)
