"""Tile grids at a target µm/px, region selection, and batched tile reading against a naive per-tile loop."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from kits.slides import write_pyramid
from PIL import Image
from skimage import data

from wsi_llava.errors import Cancelled, RegionError, SlideError
from wsi_llava.progress import CancelToken
from wsi_llava.slide import Region, open_slide, tiling
from wsi_llava.slide.tiling import TileGrid, iter_tile_batches, make_tile_grid, select_tiles

W, H = 2048, 1536  # level 0 at 0.25 µm/px; tissue (IHC texture) on the left half, glass on the right


def _write_half_tissue(path: Path, mpp: float = 0.25) -> Path:
    ihc = data.immunohistochemistry()
    img = np.full((H, W, 3), 244, np.uint8)
    img[:, : W // 2] = np.tile(ihc, (3, 2, 1))[:H, : W // 2]
    return write_pyramid(path, img, mpp, compression="jpeg", compressionargs={"level": 90})


@pytest.fixture(scope="module")
def half(tmp_path_factory) -> Path:
    return _write_half_tissue(tmp_path_factory.mktemp("tiling") / "half.tif")


@pytest.fixture(scope="module")
def grid64(half) -> TileGrid:
    with open_slide(half) as s:
        return make_tile_grid(s, target_mpp=0.5, tile_size=64)


def naive_tiles(slide, grid: TileGrid, indices, level: int = 0) -> np.ndarray:
    """One read_region per tile at ``level``, resized to tile_size with Pillow (the slow reference)."""
    t = round(grid.tile_size_level0 / slide.level_downsamples[level])
    out = []
    for x, y in grid.coords[np.asarray(indices)]:
        tile = slide.read_region((int(x), int(y)), level, (t, t))
        if t != grid.tile_size:
            tile = np.asarray(Image.fromarray(tile).resize((grid.tile_size,) * 2, Image.Resampling.BILINEAR))
        out.append(tile)
    return np.stack(out)


def test_grid_from_quarter_micron_slide(half):
    with open_slide(half) as s:
        g = make_tile_grid(s)  # 256 px at 0.5 µm/px, as Prov-GigaPath
    assert (g.tile_size, g.target_mpp, g.slide_mpp) == (256, 0.5, 0.25)
    assert g.tile_size_level0 == 512
    assert g.slide_dimensions == (W, H)
    assert g.coords.dtype == np.int32 and g.coords.shape == (len(g), 2)
    # tissue only on the left half: columns 0 and 1 of the 512-px grid, all three rows
    assert sorted(map(tuple, g.coords.tolist())) == [(x, y) for x in (0, 512) for y in (0, 512, 1024)]


def test_grid_is_row_major_and_on_tissue_only(grid64):
    c = grid64.coords
    assert grid64.tile_size_level0 == 128
    assert np.array_equal(np.lexsort((c[:, 0], c[:, 1])), np.arange(len(c)))  # sorted by y, then x
    assert (c % 128 == 0).all()
    assert (c[:, 0] < W // 2).all()  # nothing on the glass
    assert len(grid64) >= 0.6 * (W // 2 // 128) * (H // 128)  # most of the tissue half is kept
    assert not grid64.coords.flags.writeable


def test_min_tissue_zero_and_explicit_mask(half):
    with open_slide(half) as s:
        everything = make_tile_grid(s, tile_size=64, min_tissue=0)
        assert len(everything) == (W // 128) * (H // 128)
        top = np.zeros((12, 16), bool)
        top[:3] = True  # a mask at tile resolution: only the first three rows
        g = make_tile_grid(s, tile_size=64, mask=top)
        assert len(g) == 3 * 16 and set(g.coords[:, 1].tolist()) == {0, 128, 256}


def test_missing_mpp_and_upsampling(tmp_path, caplog):
    p = tmp_path / "nompp.tif"
    tifffile.imwrite(p, np.full((512, 512, 3), 200, np.uint8), photometric="rgb", tile=(256, 256))
    with open_slide(p) as s, pytest.raises(SlideError, match=r"nompp\.tif.*--mpp"):
        make_tile_grid(s)
    with open_slide(p, mpp=1.0) as s, caplog.at_level(logging.WARNING):
        g = make_tile_grid(s, target_mpp=0.5, tile_size=256, min_tissue=0)
    assert g.tile_size_level0 == 128 and len(g) == 16
    assert "coarser than the target" in caplog.text


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_batches_equal_naive_reads_in_order(half, grid64, batch_size):
    rng = np.random.default_rng(batch_size)
    order = rng.permutation(len(grid64))[:40]
    with open_slide(half) as s:
        got_idx, got = [], []
        for idx, tiles in iter_tile_batches(s, grid64, order, batch_size=batch_size, workers=2):
            assert tiles.dtype == np.uint8 and tiles.shape[1:] == (64, 64, 3)
            assert len(idx) <= batch_size
            got_idx.append(idx)
            got.append(tiles)
        got_idx, got = np.concatenate(got_idx), np.concatenate(got)
        assert np.array_equal(got_idx, order)
        # 128 level-0 px -> 64 px: level 1 (ds 2) is read, without resampling
        assert s.best_level_for_downsample(2.0) == 1
        same_level = naive_tiles(s, grid64, order, level=1)
        np.testing.assert_array_equal(got, same_level)
        # against level-0 reads shrunk 2x: only JPEG and resampling differences
        level0 = naive_tiles(s, grid64, order, level=0)
        assert np.abs(got.astype(int) - level0.astype(int)).mean() < 4.0


def test_non_integer_scale_on_real_he_slide(cmu_svs):
    with open_slide(cmu_svs) as s:
        g = make_tile_grid(s, target_mpp=0.5, tile_size=256)
        assert g.tile_size_level0 == 257  # 256 * 0.5 / 0.499
        idx = np.arange(min(len(g), 12))
        got = np.concatenate([t for _, t in iter_tile_batches(s, g, idx, batch_size=5)])
        ref = naive_tiles(s, g, idx, level=0)
    assert got.shape == (len(idx), 256, 256, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0


def test_iterates_all_tiles_by_default_and_empty_indices(half, grid64):
    with open_slide(half) as s:
        seen = np.concatenate([i for i, _ in iter_tile_batches(s, grid64, batch_size=32)])
        assert np.array_equal(seen, np.arange(len(grid64)))
        assert list(iter_tile_batches(s, grid64, np.array([], dtype=int))) == []
        with pytest.raises(RegionError, match="tile indices"):
            list(iter_tile_batches(s, grid64, [len(grid64)]))


def test_cancel_stops_iteration(half, grid64):
    token = CancelToken()
    with open_slide(half) as s:
        batches = []
        with pytest.raises(Cancelled):
            for idx, _ in iter_tile_batches(s, grid64, batch_size=4, cancel=token):
                batches.append(idx)
                token.cancel()
        assert len(batches) == 1
        with pytest.raises(Cancelled):
            next(iter_tile_batches(s, grid64, batch_size=4, cancel=token))


def test_prefetch_is_bounded(half, grid64, monkeypatch):
    calls = []
    lock = threading.Lock()
    real = tiling.read_tiles

    def counting(*args, **kwargs):
        with lock:
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "read_tiles", counting)
    with open_slide(half) as s:
        it = iter_tile_batches(s, grid64, batch_size=2, workers=2)
        next(it)
        time.sleep(0.3)  # give the pool every chance to run ahead
        assert len(calls) <= 3  # workers + 1 batches, however long the consumer takes
        it.close()


def test_select_tiles_rectangle_polygon_holes_and_small_regions(grid64):
    g = grid64
    rect = Region.rectangle(0, 0, 512, 256)
    sel = select_tiles(g, rect)
    assert sorted(map(tuple, g.coords[sel].tolist())) == [
        (x, y) for x in (0, 128, 256, 384) for y in (0, 128)
    ]
    assert np.all(np.diff(sel) > 0)  # row-major order kept

    tri = Region(points=[(0, 0), (1000, 0), (0, 1000)])
    sel = select_tiles(g, tri)
    cx, cy = g.centers[:, 0], g.centers[:, 1]
    inside = cx + cy < 1000
    assert np.array_equal(sel, np.flatnonzero(inside))

    donut = Region(
        points=[(0, 0), (1024, 0), (1024, 1024), (0, 1024)],
        holes=[[(256, 256), (768, 256), (768, 768), (256, 768)]],
    )
    sel = select_tiles(g, donut)
    c = g.centers[sel]
    assert not ((c > 256) & (c < 768)).all(axis=1).any()
    cc = g.centers
    outer = (cc < 1024).all(axis=1)
    in_hole = ((cc > 256) & (cc < 768)).all(axis=1)
    assert np.array_equal(sel, np.flatnonzero(outer & ~in_hole)) and in_hole.sum() > 0

    tiny = Region.rectangle(140, 140, 20, 20)  # inside tile (128, 128) but contains no tile centre
    assert g.coords[select_tiles(g, tiny)].tolist() == [[128, 128]]


def test_select_tiles_errors(grid64):
    with pytest.raises(RegionError, match="outside the slide"):
        select_tiles(grid64, Region.rectangle(5000, 5000, 100, 100), source="tumour.geojson")
    with pytest.raises(RegionError, match=r"glass: region .* contains no tissue tiles"):
        select_tiles(grid64, Region.rectangle(1500, 200, 300, 300), source="glass")


def test_overview_reads_big_levels_in_bands(cmu_svs):
    with open_slide(cmu_svs) as s:  # one level of 2220x2967: a whole-level read the bands avoid
        whole = s.thumbnail(512)
        banded = tiling.overview(s, 512, max_pixels=200_000)
    assert banded.shape == whole.shape == (512, 383, 3)
    assert np.abs(banded.astype(int) - whole.astype(int)).mean() < 2.0


def test_tissue_fractions_counts_partial_edge_tiles_as_background():
    mask = np.ones((10, 10), bool)
    coords = np.array([[0, 0], [80, 80]])
    frac = tiling.tissue_fractions(mask, coords, 40, (100, 100))  # the second tile is half outside
    assert frac[0] == 1.0 and frac[1] == pytest.approx(0.25)


def test_a_grid_of_more_than_two_million_tiles_is_refused(tmp_path):
    """--mpp 1000 (within the hard range, so accepted) makes 1-px tiles: 2.25 M of them on 1500 x 1500 px."""
    p = tmp_path / "coarse.tif"
    tifffile.imwrite(
        p, np.full((1500, 1500, 3), 240, np.uint8), photometric="rgb", tile=(256, 256), compression="zlib"
    )
    with (
        open_slide(p, mpp=1000) as s,
        pytest.raises(
            SlideError,
            match=r"coarse\.tif: 1500x1500 px at 1000 µm/px would make 2,250,000 "
            r"tiles .* over the limit of 2,000,000: check the slide's µm/px \(--mpp\)",
        ),
    ):
        make_tile_grid(s, min_tissue=0)
    with open_slide(p, mpp=0.5) as s:
        assert len(make_tile_grid(s, min_tissue=0)) == 36


@pytest.mark.parametrize(
    ("target_mpp", "tile_size", "match"),
    [
        (1e6, 256, r"--target-mpp\) must lie in 0\.05–50"),
        (1e-9, 256, r"--target-mpp\) must lie in 0\.05–50"),
        (0.5, 10**6, r"tile size must be 1\.\.4096 pixels \(--tile-size\)"),
    ],
)
def test_target_resolution_and_tile_size_out_of_range_are_refused(tmp_path, target_mpp, tile_size, match):
    p = _write_half_tissue(tmp_path / "s.tif")
    with open_slide(p) as s, pytest.raises(SlideError, match=match):
        make_tile_grid(s, target_mpp=target_mpp, tile_size=tile_size, min_tissue=0)
