"""Grid tiles straight from the JPEG tile streams of a tiled JPEG TIFF (Aperio SVS included), batched.

A grid tile (``tile_size`` px at the grid's µm/px) covers ``size_at_level`` px at the read level; the
TIFF's own tiles (any size, e.g. Aperio's 240 px) lie under it in any way: misaligned, several of them,
past the image edge. For a batch of grid tiles :func:`plan_batch` lists the covering file tiles once
each, :func:`read_streams` reads their streams with ``pread`` (consecutive ones in one call) and splices
the shared ``JPEGTables`` in, :func:`decode_batch` decodes them all at once with
``torchvision.io.decode_jpeg`` (nvJPEG on CUDA; those the previous batch decoded are reused), and
:func:`assemble` gathers the grid tiles out of the decoded tiles on the device (white outside the
image and where the scanner left a tile out, as the readers give) and resizes them with
antialiasing as :func:`~wsi_llava.slide.tiling.read_tiles` does.
A grid tile that is exactly one file tile (a 0.5 µm/px TIFF with 256-px tiles) is the degenerate case.

Tile offsets come from tifffile for any reader whose levels are the file's tiled pages: the tifffile
reader and OpenSlide's ``aperio`` and ``generic-tiff`` backends. For OpenSlide's ``dicom`` backend the
tiles are the JPEG baseline frames of the level's DICOM WSI file (TILED_FULL, one fragment per frame),
found from the Extended Offset Table or by walking the fragments (pydicom reads the attributes).
Anything else is left to the reader.
torch is imported inside functions only.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_llava.errors import SlideError

logger = logging.getLogger(__name__)

#: TIFF Compression value of (new-style) JPEG
_JPEG = 7
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6
#: an Adobe APP14 segment with transform 0: tells libjpeg/nvJPEG the components are RGB, not YCbCr
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
#: reads of consecutive tiles are merged when the gap between them is at most this many bytes
_MAX_GAP = 64 << 10
#: and when the merged read stays below this size
_MAX_READ = 32 << 20
#: OpenSlide backends whose levels are the TIFF's tiled pages, tile for tile
_OPENSLIDE_TIFF_VENDORS = ("aperio", "generic-tiff")
#: DICOM: VL Whole Slide Microscopy Image Storage, JPEG Baseline (Process 1)
_DICOM_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
_DICOM_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
#: DICOM photometric interpretations of JPEG frames that decoders take as YCbCr, as OpenSlide does
_DICOM_YCBCR = ("YBR_FULL_422", "YBR_FULL")
#: pixels per chunk of grid tiles in :func:`assemble` (their int64 tile index: 128 MB), bounding device memory
_GATHER_CHUNK = 1 << 24
#: DICOM item and sequence delimiter tags (FFFE,E000), (FFFE,E0DD), little endian
_DICOM_ITEM, _DICOM_SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
#: what the readers give where there are no pixels (outside the image, tiles left out)
_WHITE = 255


@dataclass(frozen=True, eq=False)
class JpegTilePlan:
    """Where the JPEG tiles of the read level lie in the file, and where each grid tile lies on them."""

    path: str
    level: int
    tile_size: int  # grid tile edge, output pixels
    size_at_level: int  # grid tile edge at the read level
    file_tile: tuple[int, int]  # (width, height) of the TIFF's tiles
    level_size: tuple[int, int]  # (width, height) of the read level
    origins: np.ndarray  # (N, 2) int64 top-left (x, y) of each grid tile at the read level
    offsets: np.ndarray  # (tiles,) int64 file offset of each TIFF tile of the level, row-major
    counts: np.ndarray  # (tiles,) int64 byte count (0: a tile the scanner left out)
    header: bytes  # SOI [+ Adobe RGB marker] + the shared tables, spliced in front of each stream

    @property
    def tiles_across(self) -> int:
        """TIFF tiles per row of the level."""
        return -(-self.level_size[0] // self.file_tile[0])

    @property
    def tiles_down(self) -> int:
        """TIFF tiles per column of the level."""
        return -(-self.level_size[1] // self.file_tile[1])

    @property
    def resize(self) -> bool:
        """Whether grid tiles are resampled (their size at the read level is not the output size)."""
        return self.size_at_level != self.tile_size


@dataclass(frozen=True, eq=False)
class JpegBatch:
    """The TIFF tiles a batch of grid tiles needs (each once) and which of them lies where in each."""

    indices: np.ndarray  # (B,) grid tile indices
    tiles: np.ndarray  # (U,) TIFF tile numbers to read and decode, ascending
    cover: np.ndarray  # (B, rows, cols) int64 position in ``tiles`` of each covering tile; U: none (white)
    first: np.ndarray  # (B, 2) int64 (column, row) of each grid tile's top-left covering TIFF tile


@dataclass(frozen=True)
class _Page:
    """What a plan needs of one level's tiles: a tiled TIFF page, or the frames of a DICOM WSI instance
    (TIFF codes: JPEG 7, YCbCr 6, chunky 1), copied out so the file can be closed."""

    path: str  # the file the tiles are in
    compression: int
    photometric: int
    samples: int
    bits: int
    planar: int
    size: tuple[int, int]
    tile: tuple[int, int]
    offsets: np.ndarray
    counts: np.ndarray
    jpegtables: bytes | None


def _reader_name(reader: Any) -> str:
    return str(getattr(reader, "reader_name", type(reader).__name__))


def _level_page(reader: Any, level: int) -> tuple[_Page | None, str | None]:
    """The tiled page of ``reader``'s ``level`` read with tifffile, or None and why not."""
    import tifffile

    props = getattr(reader, "properties", None)
    vendor = props.get("openslide.vendor") if isinstance(props, dict) else None
    if vendor == "dicom":
        return _dicom_level_page(reader, level)
    if vendor is not None and vendor not in _OPENSLIDE_TIFF_VENDORS:
        return None, f"OpenSlide's {vendor} levels are not the file's TIFF tiles"
    path = Path(reader.path)
    if not path.is_file():
        return None, "the slide is not a single file"
    width, height = (int(v) for v in reader.level_dimensions[level])
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as e:  # noqa: BLE001 - not a TIFF tifffile reads: the reader's business
        return None, f"tifffile cannot read the file ({type(e).__name__})"
    with tif:
        found: dict[int, Any] = {}
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
        for series in tif.series:
            for lvl in series.levels:
                if len(lvl.pages) == 1 and isinstance(lvl.pages[0], tifffile.TiffPage):
                    pages.append(lvl.pages[0])
        for p in pages:
            if (
                p.is_tiled
                and p.tiledepth == 1
                and p.imagedepth == 1
                and (p.imagewidth, p.imagelength) == (width, height)
            ):
                found[p.offset] = p
        if not found:
            return None, f"no tiled TIFF page of {width}x{height} px (level {level})"
        if len(found) > 1:
            return None, f"{len(found)} tiled TIFF pages of {width}x{height} px (level {level})"
        p = next(iter(found.values()))
        page = _Page(
            path=str(path),
            compression=int(p.compression),
            photometric=int(p.photometric),
            samples=int(p.samplesperpixel),
            bits=int(p.bitspersample),
            planar=int(p.planarconfig),
            size=(int(p.imagewidth), int(p.imagelength)),
            tile=(int(p.tilewidth), int(p.tilelength)),
            offsets=np.asarray(p.dataoffsets, dtype=np.int64),
            counts=np.asarray(p.databytecounts, dtype=np.int64),
            jpegtables=bytes(p.jpegtables) if p.jpegtables else None,
        )
    return page, None


def _dicom_level_page(reader: Any, level: int) -> tuple[_Page | None, str | None]:
    """OpenSlide's DICOM ``level`` as a page: the one file of the slide's series beside ``reader.path``
    holding a VOLUME image of the level's size, its JPEG frames (TILED_FULL, row-major) as the tiles."""
    try:
        import pydicom
    except ImportError:
        return None, "pydicom is not installed: it locates the frames of DICOM files"
    series = reader.properties.get("dicom.SeriesInstanceUID")
    width, height = (int(v) for v in reader.level_dimensions[level])
    folder = Path(reader.path).parent
    found: dict[str, tuple[Path, Any, int]] = {}
    for entry in sorted(folder.iterdir()):
        try:
            with open(entry, "rb") as f:
                if f.read(132)[128:] != b"DICM":
                    continue
                f.seek(0)
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                pixel_at = f.tell()  # dcmread stops at the Pixel Data tag (checked below)
        except Exception:  # noqa: BLE001 - not a DICOM file pydicom reads: not one of the levels
            continue
        image_type = list(ds.get("ImageType") or [])
        if (
            ds.file_meta.get("MediaStorageSOPClassUID") == _DICOM_WSI
            and str(ds.get("SeriesInstanceUID")) == series
            and len(image_type) > 2
            and image_type[2] == "VOLUME"
            and (ds.get("TotalPixelMatrixColumns"), ds.get("TotalPixelMatrixRows")) == (width, height)
        ):
            found.setdefault(str(ds.SOPInstanceUID), (entry, ds, pixel_at))  # copies: the same instance
    if not found:
        return None, f"no DICOM file of the series in {folder} holds level {level} ({width}x{height} px)"
    if len(found) > 1:
        return None, f"level {level} is split over {len(found)} DICOM files (a concatenation)"
    path, ds, pixel_at = next(iter(found.values()))
    syntax = str(ds.file_meta.get("TransferSyntaxUID"))
    if syntax != _DICOM_JPEG_BASELINE:
        return None, f"{path.name}: transfer syntax {syntax}, not JPEG baseline ({_DICOM_JPEG_BASELINE})"
    organization = ds.get("DimensionOrganizationType", "TILED_SPARSE")  # OpenSlide's default too
    if organization != "TILED_FULL":
        return None, f"{path.name}: frames are {organization}, not TILED_FULL"
    if "ConcatenationUID" in ds:
        return None, f"{path.name}: one file of a concatenation"
    if int(ds.get("TotalPixelMatrixFocalPlanes", 1)) != 1 or int(ds.get("NumberOfOpticalPaths", 1)) != 1:
        return None, f"{path.name}: several focal planes or optical paths"
    photometric = str(ds.get("PhotometricInterpretation"))
    if photometric not in _DICOM_YCBCR:
        return None, f"{path.name}: {photometric} JPEG frames (decoded here as YCbCr only)"
    tile = (int(ds.Columns), int(ds.Rows))
    ntiles = -(-width // tile[0]) * -(-height // tile[1])
    if int(ds.get("NumberOfFrames", 1)) != ntiles:
        return (
            None,
            f"{path.name}: {ds.get('NumberOfFrames', 1)} frames, TILED_FULL {width}x{height} needs {ntiles}",
        )
    eot = ds.get("ExtendedOffsetTable")
    eot_lengths = ds.get("ExtendedOffsetTableLengths")
    with open(path, "rb") as f:
        frames, reason = _dicom_frames(f, pixel_at, ntiles, eot, eot_lengths)
    if frames is None:
        return None, f"{path.name}: {reason}"
    return _Page(
        path=str(path),
        compression=_JPEG,
        photometric=_PHOTOMETRIC_YCBCR,
        samples=int(ds.SamplesPerPixel),
        bits=int(ds.BitsStored),
        planar=int(ds.get("PlanarConfiguration", 0)) + 1,  # DICOM 0 (interleaved) is TIFF 1 (chunky)
        size=(width, height),
        tile=tile,
        offsets=frames[0],
        counts=frames[1],
        jpegtables=None,  # DICOM frames are whole JPEG streams, tables included
    ), None


def _dicom_frames(
    f: Any, pixel_at: int, n: int, eot: bytes | None, eot_lengths: bytes | None
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
    """File offsets and byte counts of ``n`` encapsulated frames, one fragment each, in file ``f`` whose
    Pixel Data element starts at ``pixel_at``: from the Extended Offset Table if there is one, else by
    walking the fragments (checked against a non-empty Basic Offset Table)."""
    f.seek(pixel_at)
    tag, vr, length = struct.unpack("<4s2s2xI", f.read(12))
    if tag != b"\xe0\x7f\x10\x00" or vr != b"OB" or length != 0xFFFFFFFF:
        return None, "no encapsulated Pixel Data where the attributes end"
    head = f.read(8)
    if len(head) != 8 or head[:4] != _DICOM_ITEM:
        return None, "the Pixel Data have no Basic Offset Table item"
    bot_length = struct.unpack("<I", head[4:])[0]
    bot = np.frombuffer(f.read(bot_length), dtype="<u4").astype(np.int64)
    first = pixel_at + 20 + bot_length  # the first fragment's item tag: what offsets count from
    if eot is not None and eot_lengths is not None:
        offsets = np.frombuffer(eot, dtype="<u8").astype(np.int64)
        counts = np.frombuffer(eot_lengths, dtype="<u8").astype(np.int64)
        if offsets.size != n or counts.size != n:
            return None, f"the Extended Offset Table lists {offsets.size} frames, not {n}"
        for k in {0, n - 1}:  # the ends must be items of the stated length
            f.seek(first + int(offsets[k]))
            item = f.read(8)
            if item[:4] != _DICOM_ITEM or struct.unpack("<I", item[4:])[0] != counts[k]:
                return None, f"frame {k + 1} is not the item the Extended Offset Table points at"
        return (first + offsets + 8, counts), None
    starts: list[int] = []
    lengths: list[int] = []
    pos = first
    while True:
        f.seek(pos)
        item = f.read(8)
        if len(item) != 8:
            return None, "the Pixel Data end without a sequence delimiter (file truncated?)"
        if item[:4] == _DICOM_SEQ_END:
            break
        if item[:4] != _DICOM_ITEM:
            return None, f"no fragment item at byte {pos}"
        size = struct.unpack("<I", item[4:])[0]
        starts.append(pos + 8)
        lengths.append(size)
        pos += 8 + size
        if len(starts) > n:
            break
    if len(starts) != n:
        return None, f"{'more than ' if len(starts) > n else ''}{len(starts)} fragments for {n} frames"
    offsets = np.asarray(starts, dtype=np.int64)
    if bot.size and not np.array_equal(bot, offsets - 8 - first):
        return None, "the Basic Offset Table does not match the fragments"
    return (offsets, np.asarray(lengths, dtype=np.int64)), None


def jpeg_plan(reader: Any, grid: Any) -> tuple[JpegTilePlan | None, str | None]:
    """The plan of ``grid`` on ``reader``'s JPEG tiles, or None and the reason the reader must read them."""
    from wsi_llava.slide.tiling import _plan

    if not hasattr(os, "pread"):
        return None, "os.pread is not available on this system"
    rplan = _plan(reader, grid)
    level = rplan.level
    page, reason = _level_page(reader, level)
    if page is None:
        return None, reason
    if page.compression != _JPEG:
        return None, f"level {level} is compressed with {page.compression}, not JPEG ({_JPEG})"
    if page.photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR) or page.samples != 3:
        return None, f"level {level} is not 3-sample RGB/YCbCr"
    if page.bits != 8:
        return None, f"level {level} has {page.bits}-bit samples"
    if page.planar != 1:
        return None, f"level {level} stores its samples in separate planes"
    ntiles = -(-page.size[0] // page.tile[0]) * -(-page.size[1] // page.tile[1])
    if page.offsets.size != ntiles or page.counts.size != ntiles:
        return None, f"level {level} lists {page.offsets.size} tiles, its size makes {ntiles}"
    file_size = Path(page.path).stat().st_size
    if ntiles and int((page.offsets + page.counts).max()) > file_size:
        return None, f"tiles of level {level} extend past the end of the file (truncated?)"
    ds = rplan.downsample
    if hasattr(reader, "level_scale"):  # the tifffile reader maps level-0 locations per axis
        sx, sy = (float(v) for v in reader.level_scale(level))
    else:  # OpenSlide divides both by the level's downsample
        sx = sy = ds
    if abs(sx - ds) > 0.01 * ds or abs(sy - ds) > 0.01 * ds:
        return None, f"level {level} has unequal x/y downsamples {sx:.4f}/{sy:.4f}"
    coords = grid.coords.astype(np.float64)
    origins = np.stack([np.floor(coords[:, 0] / sx), np.floor(coords[:, 1] / sy)], axis=1).astype(np.int64)
    header = b"\xff\xd8"
    if page.photometric == _PHOTOMETRIC_RGB:
        header += _ADOBE_RGB  # TIFF says RGB: JPEG decoders would otherwise assume YCbCr
    if page.jpegtables:
        tables = page.jpegtables
        if not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
            return None, "JPEGTables are not an SOI ... EOI stream"
        header += tables[2:-2]
    plan = JpegTilePlan(
        path=page.path,
        level=level,
        tile_size=int(grid.tile_size),
        size_at_level=int(rplan.size_at_level),
        file_tile=page.tile,
        level_size=page.size,
        origins=origins.reshape(-1, 2),
        offsets=page.offsets,
        counts=page.counts,
        header=header,
    )
    return plan, None


def log_plan(reader: Any, plan: JpegTilePlan | None, reason: str | None) -> None:
    """Say (once per slide) which way the grid's tiles will be read, or why the reader reads them."""
    if plan is None:
        logger.info(
            "%s: no direct JPEG tile decoding (%s); tiles are read through the %s reader",
            reader.path,
            reason,
            _reader_name(reader),
        )
        return
    logger.info(
        "%s: grid tiles from JPEG tile streams: %d px at level %d on %dx%d tiles of %s%s",
        reader.path,
        plan.size_at_level,
        plan.level,
        *plan.file_tile,
        Path(plan.path).name,
        f", resized to {plan.tile_size} px" if plan.resize else "",
    )


def plan_jpeg_tiles(reader: Any, grid: Any) -> JpegTilePlan | None:
    """:func:`jpeg_plan`, logged (:func:`log_plan`); None when the reader must read the tiles."""
    plan, reason = jpeg_plan(reader, grid)
    log_plan(reader, plan, reason)
    return plan


def plan_batch(plan: JpegTilePlan, indices: np.ndarray) -> JpegBatch:
    """The TIFF tiles under grid tiles ``indices``: each listed once, in file order; missing ones left out."""
    idx = np.asarray(indices, dtype=np.int64).ravel()
    o = plan.origins[idx]
    tw, th = plan.file_tile
    ntx, nty = plan.tiles_across, plan.tiles_down
    span = plan.size_at_level - 1
    c0, c1 = o[:, 0] // tw, (o[:, 0] + span) // tw
    r0, r1 = o[:, 1] // th, (o[:, 1] + span) // th
    ncols = int((c1 - c0).max()) + 1 if idx.size else 1
    nrows = int((r1 - r0).max()) + 1 if idx.size else 1
    cols = c0[:, None] + np.arange(ncols)
    rows = r0[:, None] + np.arange(nrows)
    col_ok = (cols >= 0) & (cols < ntx) & (cols <= c1[:, None])
    row_ok = (rows >= 0) & (rows < nty) & (rows <= r1[:, None])
    ok = row_ok[:, :, None] & col_ok[:, None, :]
    number = np.where(ok, rows[:, :, None] * ntx + cols[:, None, :], 0)
    ok &= plan.counts[number] > 0
    tiles = np.unique(number[ok])
    cover = np.where(ok, np.searchsorted(tiles, number), tiles.size).astype(np.int64)
    return JpegBatch(indices=idx, tiles=tiles, cover=cover, first=np.stack([c0, r0], axis=1))


def splice(header: bytes, stream: bytes | memoryview) -> bytes:
    """One decodable JPEG: ``header`` (SOI, markers, tables) + the tile stream without its own SOI.

    A pad byte after EOI (DICOM items are even-length) is dropped."""
    if stream[-3:] == b"\xff\xd9\x00":
        stream = stream[:-1]
    return header + bytes(stream[2:]) if header != b"\xff\xd8" else bytes(stream)


def read_streams(plan: JpegTilePlan, fd: int, tiles: np.ndarray) -> list[bytes]:
    """Spliced JPEG streams of TIFF tiles ``tiles`` (none may be missing), in that order.

    Streams close together in the file are fetched with one ``pread``.
    """
    idx = np.asarray(tiles, dtype=np.int64).ravel()
    offs, cnts = plan.offsets[idx], plan.counts[idx]
    if np.any(cnts <= 0):
        raise ValueError("read_streams got TIFF tiles without data")
    order = np.argsort(offs, kind="stable")
    out: list[bytes] = [b""] * len(idx)
    k = 0
    while k < len(order):
        start = int(offs[order[k]])
        end = start + int(cnts[order[k]])
        j = k + 1
        while j < len(order):
            o = int(offs[order[j]])
            e = o + int(cnts[order[j]])
            if o - end > _MAX_GAP or max(e, end) - start > _MAX_READ:
                break
            end = max(end, e)
            j += 1
        buf = os.pread(fd, end - start, start)
        if len(buf) != end - start:
            raise OSError(f"{plan.path}: short read at byte {start} (file truncated?)")
        view = memoryview(buf)
        for m in order[k:j]:
            o = int(offs[m]) - start
            out[m] = splice(plan.header, view[o : o + int(cnts[m])])
        k = j
    return out


def decode_streams(streams: list[bytes], device: Any = "cpu") -> Any:
    """Decode JPEG streams to a ``(B, H, W, 3)`` uint8 tensor on ``device`` (nvJPEG on CUDA, batched)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return torch.empty((0, 0, 0, 3), dtype=torch.uint8, device=torch.device(device))
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    with warnings.catch_warnings():  # torchvision >= 0.29 flags its image codecs as deprecated
        warnings.simplefilter("ignore")
        dec = decode_jpeg(data, mode=ImageReadMode.RGB, device=torch.device(device))
    shapes = {tuple(d.shape) for d in dec}
    if len(shapes) > 1:
        raise SlideError(
            f"JPEG tiles decode to different sizes {sorted(shapes)}; TIFF tiles are all one size"
        )
    return torch.stack(dec).permute(0, 2, 3, 1)


def decode_batch(
    batch: JpegBatch, streams: list[bytes], device: Any, previous: tuple[np.ndarray, Any] | None = None
) -> Any:
    """``batch.tiles`` decoded on ``device``; those the previous batch decoded too (``previous``: its
    ``(tiles, decoded)``) are copied from it instead: row-major batches share a row of TIFF tiles."""
    import torch

    if previous is None or len(previous[0]) == 0 or len(batch.tiles) == 0:
        return decode_streams(streams, device)
    prev_tiles, prev = previous
    pos = np.minimum(np.searchsorted(prev_tiles, batch.tiles), len(prev_tiles) - 1)
    hit = prev_tiles[pos] == batch.tiles
    if not hit.any():
        return decode_streams(streams, device)
    fresh = np.flatnonzero(~hit)
    out = torch.empty((len(batch.tiles), *prev.shape[1:]), dtype=torch.uint8, device=prev.device)
    out[torch.as_tensor(np.flatnonzero(hit), device=prev.device)] = prev[
        torch.as_tensor(pos[hit], device=prev.device)
    ]
    if fresh.size:
        dec = decode_streams([streams[k] for k in fresh], device)
        if dec.shape[1:] != prev.shape[1:]:
            raise SlideError(f"JPEG tiles decode to {tuple(dec.shape[1:])} and {tuple(prev.shape[1:])}")
        out[torch.as_tensor(fresh, device=prev.device)] = dec
    return out


def _resize(x: Any, size: int) -> Any:
    """``(B, S, S, 3)`` uint8 to ``size`` px as :func:`~wsi_llava.slide.tiling._resize_tile` does (Pillow):
    a box mean for whole-number reductions, else antialiased bilinear."""
    import torch
    import torch.nn.functional as F

    n = x.shape[1]
    y = x.permute(0, 3, 1, 2)  # channels-last NCHW view
    if n > size and n % size == 0:
        y = torch.floor(F.avg_pool2d(y.float(), n // size) + 0.5)  # Pillow's reduce() rounds halves up
        return y.to(torch.uint8).permute(0, 2, 3, 1)
    if y.device.type == "cpu":  # uint8 has its own (Pillow-matching, vectorised) kernel on CPU only
        return F.interpolate(y, size=(size, size), mode="bilinear", antialias=True).permute(0, 2, 3, 1)
    return bilinear_float(x, size)


def bilinear_float(x: Any, size: int) -> Any:
    """Antialiased bilinear resize of ``(B, S, S, 3)`` uint8 computed in float32 (the CUDA kernel's way)."""
    import torch
    import torch.nn.functional as F

    y = x.permute(0, 3, 1, 2).float()
    y = F.interpolate(y, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return torch.round(y).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def assemble(plan: JpegTilePlan, batch: JpegBatch, decoded: Any) -> Any:
    """The batch's grid tiles, ``(B, tile_size, tile_size, 3)`` uint8 on ``decoded``'s device.

    ``decoded`` holds ``batch.tiles`` decoded, in order. Each output pixel is gathered from its TIFF
    tile (two indexing passes per chunk of grid tiles), or white where the level has no pixels.
    """
    import torch

    tw, th = plan.file_tile
    lw, lh = plan.level_size
    n_tiles = int(batch.tiles.size)
    if int(decoded.shape[0]) != n_tiles:
        raise SlideError(f"{plan.path}: {decoded.shape[0]} JPEG tiles decoded, {n_tiles} expected")
    if n_tiles and tuple(decoded.shape[1:]) != (th, tw, 3):
        raise SlideError(
            f"{plan.path}: JPEG tiles of level {plan.level} decode to {tuple(decoded.shape[1:])}, "
            f"the TIFF says {th}x{tw} RGB"
        )
    dev = decoded.device
    atlas = torch.empty((n_tiles + 1, th, tw, 3), dtype=torch.uint8, device=dev)
    if n_tiles:
        atlas[:n_tiles] = decoded
    atlas[n_tiles] = _WHITE
    sl, ts = plan.size_at_level, plan.tile_size
    b, nrows, ncols = batch.cover.shape
    # per output row (column): which covering TIFF tile, the extra last one (white) outside the level,
    # and the row (column) inside it; the pixel gather below broadcasts these, nothing (B, S, S) but it
    cover = np.full((b, nrows + 1, ncols + 1), n_tiles, np.int64)
    cover[:, :nrows, :ncols] = batch.cover
    o = plan.origins[batch.indices]
    span = np.arange(sl)
    ly, lx = o[:, 1:] + span, o[:, :1] + span
    row = np.where((ly >= 0) & (ly < lh), ly // th - batch.first[:, 1:], nrows)
    col = np.where((lx >= 0) & (lx < lw), lx // tw - batch.first[:, :1], ncols)
    cover_t, row_t, col_t, y_t, x_t = (
        torch.as_tensor(v, device=dev) for v in (cover, row, col, ly % th, lx % tw)
    )
    out = torch.empty((b, ts, ts, 3), dtype=torch.uint8, device=dev)
    step = max(1, _GATHER_CHUNK // (sl * sl))
    for s in range(0, b, step):
        e = min(b, s + step)
        i = torch.arange(s, e, device=dev)[:, None, None]
        which = cover_t[i, row_t[s:e, :, None], col_t[s:e, None, :]]  # (n, S, S) atlas entry per pixel
        tiles = atlas[which, y_t[s:e, :, None], x_t[s:e, None, :]]  # (n, S, S, 3)
        out[s:e] = _resize(tiles, ts) if plan.resize else tiles
    return out


def load_tiles(plan: JpegTilePlan, indices: np.ndarray, device: Any = "cpu", fd: int | None = None) -> Any:
    """Grid tiles ``indices`` read, decoded and assembled on ``device`` in one go (checks and tests)."""
    batch = plan_batch(plan, indices)
    own = fd is None
    if own:
        fd = os.open(plan.path, os.O_RDONLY)
    try:
        streams = read_streams(plan, fd, batch.tiles)
    finally:
        if own:
            os.close(fd)
    return assemble(plan, batch, decode_streams(streams, device))


def check_plan(reader: Any, grid: Any, plan: JpegTilePlan, device: Any, n: int = 4) -> str | None:
    """Assemble up to ``n`` grid tiles on ``device`` and compare with the reader; None if they agree.

    Catches colour-space surprises (e.g. RGB JPEG data mislabelled) and layouts the reader does not
    share before a whole slide is encoded. Returns a reason string when they differ by more than JPEG
    decoder and resampling rounding.
    """
    from wsi_llava.slide.tiling import read_tiles

    if len(grid) == 0:
        return "the grid has no tiles"
    batch = plan_batch(plan, np.arange(len(grid)))
    with_data = np.flatnonzero((batch.cover < batch.tiles.size).any(axis=(1, 2)))
    if with_data.size == 0:
        return "no grid tile lies on a stored JPEG tile"
    pick = with_data[np.linspace(0, with_data.size - 1, min(n, with_data.size)).astype(np.int64)]
    try:
        fast = load_tiles(plan, pick, device).cpu().numpy()
    except Exception as e:  # noqa: BLE001 - any decoder failure means: use the reader
        return f"decoding failed: {type(e).__name__}: {e}"
    ref = read_tiles(reader, grid, pick)
    if fast.shape != ref.shape:
        return f"assembled tiles are {fast.shape[1:]}, the reader gives {ref.shape[1:]}"
    diff = np.abs(fast.astype(np.int16) - ref.astype(np.int16))
    # decoders differ in IDCT and chroma upsampling by a few levels; a wrong colour space by tens
    if float(diff.mean()) > 2.0 or int(np.percentile(diff, 99.9)) > 24:
        return f"assembled tiles differ from the reader's (mean {diff.mean():.2f}, max {diff.max()})"
    return None
