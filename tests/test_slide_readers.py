"""Slide readers on generated pyramids (pages, SubIFDs, OME-TIFF, Aperio-like SVS) and the real H&E SVS."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import data

from wsi_llava import plugins
from wsi_llava.errors import RegionError, SlideError
from wsi_llava.hookspecs import hookimpl
from wsi_llava.slide import open_slide
from wsi_llava.slide.openslide_reader import OpenSlideReader
from wsi_llava.slide.tiff_reader import TiffReader

MPP = 0.25
APERIO = (
    "Aperio Image Library v12.0.15 \n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = {mpp}"
)


def _levels(n: int = 3) -> list[np.ndarray]:
    img = np.ascontiguousarray(np.tile(data.immunohistochemistry(), (2, 2, 1))[:768, :1024])
    levels = [img]
    for _ in range(n - 1):
        p = levels[-1]
        h, w = p.shape[:2]
        levels.append(p.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    return levels


def write_layout(path: Path, layout: str, mpp: float | None = MPP) -> Path:
    """Write the 1024x768, 3-level IHC pyramid in one of the layouts slide scanners and tools produce."""
    levels = _levels()
    kw = dict(tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90})

    def res(i: int) -> dict:
        if mpp is None:
            return {}
        r = 1e4 / (mpp * 2**i)
        return {"resolution": (r, r), "resolutionunit": "CENTIMETER"}

    with tifffile.TiffWriter(path, ome=layout == "ome") as tw:
        if layout == "pages":
            for i, lv in enumerate(levels):
                tw.write(lv, subfiletype=0 if i == 0 else 1, metadata=None, **res(i), **kw)
        elif layout == "subifd":
            tw.write(levels[0], subifds=len(levels) - 1, metadata=None, **res(0), **kw)
            for i, lv in enumerate(levels[1:], 1):
                tw.write(lv, subfiletype=1, metadata=None, **res(i), **kw)
        elif layout == "ome":  # PhysicalSizeX in nm, to exercise the unit conversion
            tw.write(
                levels[0],
                subifds=len(levels) - 1,
                metadata={"axes": "YXS", "PhysicalSizeX": mpp * 1000, "PhysicalSizeXUnit": "nm"},
                **kw,
            )
            for lv in levels[1:]:
                tw.write(lv, subfiletype=1, **kw)
        elif layout == "svs":  # level 0 tiled, stripped thumbnail, reduced levels tiled (no subfiletype)
            h, w = levels[0].shape[:2]
            desc = APERIO.format(w=w, h=h, mpp=mpp)
            tw.write(levels[0], description=desc, metadata=None, **kw)
            thumb = levels[-1][::2, ::2]
            tw.write(thumb, photometric="rgb", compression="jpeg", description=desc, metadata=None)
            for lv in levels[1:]:
                tw.write(lv, description=desc, metadata=None, **kw)
        else:
            raise ValueError(layout)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pyramids")
    out = {
        "pages": write_layout(d / "pages.tif", "pages"),
        "subifd": write_layout(d / "subifd.tif", "subifd"),
        "ome": write_layout(d / "ome.ome.tif", "ome"),
        "svs": write_layout(d / "aperio.svs", "svs"),
        "nompp": write_layout(d / "nompp.tif", "pages", mpp=None),
    }
    return out


# (layout, reader) -> levels seen; OpenSlide sees only the first level of SubIFD pyramids and no OME µm/px
EXPECTED = {
    ("pages", "tifffile"): (3, MPP),
    ("pages", "openslide"): (3, MPP),
    ("subifd", "tifffile"): (3, MPP),
    ("subifd", "openslide"): (1, MPP),
    ("ome", "tifffile"): (3, MPP),
    ("ome", "openslide"): (1, None),
    ("svs", "tifffile"): (3, MPP),
    ("svs", "openslide"): (3, MPP),
}


@pytest.mark.parametrize("layout, reader", sorted(EXPECTED))
def test_levels_downsamples_mpp_per_layout_and_reader(slides, layout, reader):
    n_levels, mpp = EXPECTED[(layout, reader)]
    with open_slide(slides[layout], reader=reader) as s:
        assert s.reader_name == reader
        assert s.dimensions == (1024, 768)
        assert s.level_count == n_levels
        assert s.level_dimensions == ((1024, 768), (512, 384), (256, 192))[:n_levels]
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0)[:n_levels])
        if mpp is None:
            assert not s.has_mpp
        else:
            assert s.mpp == pytest.approx(mpp, rel=1e-6)


@pytest.mark.parametrize("layout", ["pages", "svs"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_openslide_and_tifffile_reads_agree(slides, layout, level):
    with (
        open_slide(slides[layout], reader="openslide") as a,
        open_slide(slides[layout], reader="tifffile") as b,
    ):
        loc, size = (200, 136), (160, 120)
        ra, rb = a.read_region(loc, level, size), b.read_region(loc, level, size)
        assert ra.shape == rb.shape == (120, 160, 3) and ra.dtype == rb.dtype == np.uint8
        assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 2.0
        assert ra.std() > 5  # real texture, not a blank read


def test_tifffile_reads_match_the_written_pixels_in_every_layout(slides):
    levels = _levels()
    for layout in ("pages", "subifd", "ome", "svs"):
        with TiffReader(slides[layout]) as s:
            for lv in range(3):
                got = s.read_region((256, 128), lv, (96, 48))
                ds = 2**lv
                want = levels[lv][128 // ds : 128 // ds + 48, 256 // ds : 256 // ds + 96]
                assert np.abs(got.astype(int) - want.astype(int)).mean() < 5.0, (layout, lv)


def test_open_slide_prefers_tifffile_for_subifd_pyramids(slides):
    with open_slide(slides["subifd"]) as s:
        assert s.reader_name == "tifffile" and s.level_count == 3
    with open_slide(slides["svs"]) as s:
        assert s.reader_name == "openslide"


def test_reads_outside_the_slide_are_white_and_bad_levels_raise(slides):
    with TiffReader(slides["pages"]) as s:
        r = s.read_region((900, 700), 0, (200, 100))
        assert (r[68:, :] == 255).all() and (r[:, 124:] == 255).all()
        assert (s.read_region((5000, 5000), 1, (10, 10)) == 255).all()
        with pytest.raises(RegionError, match="level 3 does not exist"):
            s.read_region((0, 0), 3, (10, 10))


def test_level_arrays_are_lazy_zarr_levels(slides):
    with TiffReader(slides["ome"]) as s:
        arrays = s.level_arrays()
        assert [a.shape for a in arrays] == [(768, 1024, 3), (384, 512, 3), (192, 256, 3)]
        assert s.axes == "YXS"
        np.testing.assert_array_equal(
            np.asarray(arrays[1][10:20, 30:50]), s.read_region((60, 20), 1, (20, 10))
        )


def test_missing_mpp_mentions_the_option_and_override_works(slides):
    with open_slide(slides["nompp"]) as s:
        assert not s.has_mpp
        with pytest.raises(SlideError, match=r"nompp\.tif.*--mpp"):
            _ = s.mpp
    with open_slide(slides["nompp"], mpp=0.5) as s:
        assert s.mpp == 0.5
    with pytest.raises(SlideError, match="--mpp must be a positive number"):
        open_slide(slides["nompp"], mpp=-1)


def test_inch_resolution_and_anisotropic_mpp_warning(tmp_path, caplog):
    img = _levels(1)[0]
    p = tmp_path / "inch.tif"
    tifffile.imwrite(
        p, img, tile=(256, 256), photometric="rgb", resolution=(50800, 50800), resolutionunit="INCH"
    )
    with TiffReader(p) as s:
        assert s.mpp == pytest.approx(0.5)
    p2 = tmp_path / "aniso.tif"
    tifffile.imwrite(
        p2, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 1.6e4), resolutionunit="CENTIMETER"
    )
    with caplog.at_level(logging.WARNING), OpenSlideReader(p2) as s:
        assert s.mpp == pytest.approx(0.5)
    assert "differs between x" in caplog.text
    p3 = tmp_path / "default72.tif"
    tifffile.imwrite(p3, img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with TiffReader(p3) as s:
        assert not s.has_mpp


@pytest.mark.parametrize(
    ("xres", "read", "source"),
    [
        (72 / 2.54, "352.8", r"the TIFF XResolution/ResolutionUnit tags \(28.3465 px per centimetre\)"),
        (0.01, "1e\\+06", r"the TIFF XResolution/ResolutionUnit tags \(0.01 px per centimetre\)"),
    ],
)
def test_implausible_mpp_from_the_file_is_refused_naming_the_tags(tmp_path, xres, read, source):
    """A 72-dpi image stored in centimetres reads as 352.8 µm/px: a screen default, not a scan."""
    p = tmp_path / "screen.tif"
    tifffile.imwrite(
        p, _levels(1)[0][:250, :300], photometric="rgb", resolution=(xres, xres), resolutionunit="CENTIMETER"
    )
    with open_slide(p) as s:
        with pytest.raises(
            SlideError,
            match=rf"screen\.tif: {read} µm/px read from {source} is outside the "
            r"0\.05–50 µm/px of a slide scan.*--mpp",
        ):
            _ = s.mpp
        assert not s.has_mpp
    with open_slide(p, mpp=0.5) as s:  # the user's value replaces the file's
        assert s.mpp == 0.5


def test_implausible_ome_mpp_names_the_ome_field(tmp_path):
    p = tmp_path / "metres.ome.tif"
    tifffile.imwrite(
        p,
        _levels(1)[0][:256, :256],
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 1.0, "PhysicalSizeXUnit": "m"},
    )
    with (
        open_slide(p) as s,
        pytest.raises(SlideError, match=r"1e\+06 µm/px read from the OME-XML PhysicalSizeX"),
    ):
        _ = s.mpp


def test_explicit_mpp_outside_the_plausible_range_is_used_with_a_warning_within_hard_limits(tmp_path, caplog):
    p = tmp_path / "nompp.tif"
    tifffile.imwrite(p, _levels(1)[0][:256, :256], photometric="rgb")
    with caplog.at_level(logging.WARNING), open_slide(p, mpp=352.8) as s:  # the user insists
        assert s.mpp == 352.8
    assert "--mpp 352.8 µm/px is outside the 0.05–50 µm/px of slide scans; using it as given" in caplog.text
    for bad in (1e6, 1e-4, float("inf"), float("nan"), 0, -1, "0.5"):
        with pytest.raises(SlideError, match=r"nompp\.tif: --mpp"):
            open_slide(p, mpp=bad)
        with pytest.raises(SlideError, match=r"nompp\.tif: --mpp"):
            TiffReader(p, mpp=bad)


def test_rgba_planar_and_grey_tiffs_become_rgb(tmp_path):
    img = _levels(1)[0][:256, :256]
    rgba = np.concatenate([img, np.full((256, 256, 1), 255, np.uint8)], axis=-1)
    rgba[:, :100, 3] = 0  # transparent -> white
    p = tmp_path / "rgba.tif"
    tifffile.imwrite(p, rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(128, 128))
    with TiffReader(p, mpp=0.5) as s:
        r = s.read_region((0, 0), 0, (256, 256))
        assert (r[:, :100] == 255).all()
        np.testing.assert_array_equal(r[:, 100:], img[:, 100:])
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate", tile=(128, 128))
    with TiffReader(p, mpp=0.5) as s:
        assert s.axes in ("SYX", "CYX")
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (50, 40)), img[20:60, 10:60])
    p = tmp_path / "grey.tif"
    tifffile.imwrite(p, img[..., 1], tile=(128, 128))
    with TiffReader(p, mpp=0.5) as s:
        np.testing.assert_array_equal(
            s.read_region((0, 0), 0, (8, 8)), np.repeat(img[:8, :8, 1:2], 3, axis=-1)
        )
    p = tmp_path / "u16.tif"
    tifffile.imwrite(p, img.astype(np.uint16) * 200, photometric="rgb")
    with pytest.raises(SlideError, match=r"u16\.tif.*uint16.*8-bit"):
        open_slide(p)


def test_real_he_svs_opens_with_both_readers(cmu_svs):
    for reader in ("openslide", "tifffile"):
        with open_slide(cmu_svs, reader=reader) as s:
            assert s.dimensions == (2220, 2967)
            assert s.mpp == pytest.approx(0.499)
            thumb = s.thumbnail(512)
            assert thumb.shape == (512, 383, 3) and thumb.dtype == np.uint8
    with open_slide(cmu_svs, reader="openslide") as a, open_slide(cmu_svs, reader="tifffile") as b:
        ra, rb = a.read_region((1000, 1500), 0, (300, 200)), b.read_region((1000, 1500), 0, (300, 200))
        assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 2.0


def _corrupt_files(d: Path, cmu_svs: Path, pages: Path) -> list[Path]:
    blob = cmu_svs.read_bytes()
    (d / "truncated.svs").write_bytes(blob[: len(blob) // 2])
    tif = pages.read_bytes()
    (d / "truncated_pyramid.tif").write_bytes(tif[: int(len(tif) * 0.7)])
    (d / "random.svs").write_bytes(
        np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    )
    (d / "text.tif").write_text("this is not an image\n" * 100)
    (d / "empty.tiff").write_bytes(b"")
    return [d / n for n in ("truncated.svs", "truncated_pyramid.tif", "random.svs", "text.tif", "empty.tiff")]


def test_corrupt_files_raise_slide_error_naming_the_file(tmp_path, cmu_svs, slides):
    for path in _corrupt_files(tmp_path, cmu_svs, slides["pages"]):
        with pytest.raises(SlideError) as info, open_slide(path) as s:  # some damage shows only on decoding
            s.read_region((0, 0), 0, s.dimensions)
        assert str(path) in str(info.value), info.value


def test_png_directory_missing_and_unknown_reader(tmp_path, slides):
    from skimage.io import imsave

    png = tmp_path / "slide.png"
    imsave(png, _levels(1)[0][:64, :64])
    with pytest.raises(
        SlideError, match=r"slide\.png: no slide reader handles '\.png' files; supported: .*\.svs"
    ):
        open_slide(png)
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)
    with pytest.raises(SlideError, match=r"nope\.svs: no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(
        SlideError, match=r"unknown slide reader 'bioformats'; available: .*openslide.*tifffile"
    ):
        open_slide(slides["pages"], reader="bioformats")
    renamed = tmp_path / "png_named.tif"
    shutil.copyfile(png, renamed)
    with pytest.raises(
        SlideError, match=r"png_named\.tif: unsupported format or corrupt file \(tifffile: .*; openslide: "
    ):
        open_slide(renamed)


class _BrokenReader:
    """A plugin whose reader claims every file first and always fails."""

    @hookimpl
    def register_slide_readers(self, register):
        def open_fn(path, mpp):
            raise SlideError(f"{path}: broken reader refuses")

        register("broken", open_fn, suffixes=("*",), priority=1000)


def test_falls_back_to_the_next_reader_and_summarises_failures(slides, tmp_path):
    plugins.register_plugin(_BrokenReader(), name="broken-test")
    try:
        with open_slide(slides["pages"]) as s:
            assert s.reader_name == "tifffile"
        bad = tmp_path / "bad.tif"
        bad.write_text("nope")
        with pytest.raises(SlideError) as info:
            open_slide(bad)
        msg = str(info.value)
        assert msg.startswith(
            f"{bad}: unsupported format or corrupt file (broken: broken reader refuses; tifffile:"
        )
        assert "openslide:" in msg
    finally:
        plugins.unregister_plugin("broken-test")


def test_plugin_module_imports_no_slide_libraries():
    code = (
        "import sys, wsi_llava.slide, wsi_llava.slide.plugin, wsi_llava.slide.open;"
        "bad = [m for m in ('openslide', 'tifffile', 'zarr', 'torch') if m in sys.modules];"
        "assert not bad, bad"
    )
    env = {**os.environ, "WSI_LLAVA_LOAD_PLUGINS": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("layout", ["pages", "subifd", "ome", "svs"])
def test_direct_tile_decoding_matches_zarr_slices(slides, layout):
    """read_region decodes tiles itself; it must agree with tifffile's zarr view, edge tiles included."""
    rng = np.random.default_rng(3)
    with TiffReader(slides[layout]) as s:
        for lv, arr in enumerate(s.level_arrays()):
            lw, lh = s.level_dimensions[lv]
            ds = s.level_downsamples[lv]
            for _ in range(8):
                x, y = int(rng.integers(0, lw - 1)), int(rng.integers(0, lh - 1))
                w, h = int(rng.integers(1, lw - x + 1)), int(rng.integers(1, lh - y + 1))
                got = s.read_region((round(x * ds), round(y * ds)), lv, (w, h))
                np.testing.assert_array_equal(got, np.asarray(arr[y : y + h, x : x + w]))


def test_odd_sized_lossless_tiff_reads_back_exactly(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    p = tmp_path / "odd.tif"
    tifffile.imwrite(
        p,
        img,
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    with open_slide(p) as s:
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (900, 700)), img)
        np.testing.assert_array_equal(s.read_region((850, 650), 0, (40, 30)), img[650:680, 850:890])
