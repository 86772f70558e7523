"""Raw JPEG tile bytes straight out of a pyramidal JPEG TIFF, for batched (GPU) decoding.

When the tiles of a :class:`~wsi_llava.slide.tiling.TileGrid` coincide with the TIFF's own tiles at
the read level, a grid tile is one JPEG stream in the file: its bytes are read with ``pread`` (one call
per run of consecutive tiles), the shared ``JPEGTables`` are spliced in, and whole batches are decoded
at once with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA). Grid tiles that cross the image edge or
that the scanner left out are read through the reader as usual. torch is imported inside functions only.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

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


@dataclass(frozen=True, eq=False)
class JpegTilePlan:
    """Where each grid tile's JPEG stream lies in the file, or -1 when it must be read by the reader."""

    path: str
    level: int
    tile_size: int
    offsets: np.ndarray  # (N,) int64 file offset per grid tile, -1 = read through the reader
    counts: np.ndarray  # (N,) int64 byte count per grid tile
    header: bytes  # SOI [+ Adobe RGB marker] + the shared tables, spliced in front of each stream

    @property
    def n_direct(self) -> int:
        """Grid tiles decoded from their own JPEG stream."""
        return int((self.offsets >= 0).sum())


def _not_aligned(reader: Any, reason: str) -> None:
    logger.info(
        "%s: no direct JPEG tile decoding (%s); tiles are read through the reader", reader.path, reason
    )


def plan_jpeg_tiles(reader: Any, grid: Any) -> JpegTilePlan | None:
    """The raw-tile plan of ``grid`` on ``reader``, or None (logged) when its tiles are not whole JPEG tiles."""
    from wsi_llava.slide.tiling import _plan

    if not hasattr(reader, "raw_tile_page") or getattr(reader, "raw_fd", None) is None:
        _not_aligned(
            reader, f"reader {getattr(reader, 'reader_name', type(reader).__name__)} has no raw tiles"
        )
        return None
    plan = _plan(reader, grid)
    page = reader.raw_tile_page(plan.level)
    if page is None:
        _not_aligned(reader, f"level {plan.level} is not a single tiled page")
        return None
    if int(page.compression) != _JPEG:
        _not_aligned(reader, f"level {plan.level} is compressed with {page.compression!s}, not JPEG")
        return None
    photometric = int(page.photometric)
    if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR) or page.samplesperpixel != 3:
        _not_aligned(reader, f"level {plan.level} is not 3-sample RGB/YCbCr")
        return None
    if int(page.bitspersample) != 8:
        _not_aligned(reader, f"level {plan.level} has {page.bitspersample}-bit samples")
        return None
    tw, tl = int(page.tilewidth), int(page.tilelength)
    if plan.resize or tw != tl or tw != grid.tile_size or plan.size_at_level != tw:
        _not_aligned(
            reader,
            f"grid tiles of {plan.size_at_level} px at level {plan.level} (resized: {plan.resize}) "
            f"are not the TIFF's {tw}x{tl} tiles",
        )
        return None
    sx, sy = reader.level_scale(plan.level)
    if not (math.isclose(sx, plan.downsample) and math.isclose(sy, plan.downsample)):
        _not_aligned(reader, f"level {plan.level} has unequal x/y downsamples {sx:.4f}/{sy:.4f}")
        return None
    coords = grid.coords.astype(np.float64) / plan.downsample
    lvl = np.round(coords).astype(np.int64)
    if len(lvl) and (not np.allclose(coords, lvl, atol=1e-6) or np.any(lvl % tw)):
        _not_aligned(reader, f"grid origins do not fall on the {tw}-px TIFF tile grid of level {plan.level}")
        return None
    ntx = -(-int(page.imagewidth) // tw)
    inside = (lvl[:, 0] + tw <= page.imagewidth) & (lvl[:, 1] + tl <= page.imagelength) & (lvl >= 0).all(1)
    tile_idx = np.where(inside, (lvl[:, 1] // tl) * ntx + lvl[:, 0] // tw, 0)
    all_offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    all_counts = np.asarray(page.databytecounts, dtype=np.int64)
    counts = np.where(inside, all_counts[tile_idx], 0)
    offsets = np.where(inside & (counts > 0), all_offsets[tile_idx], -1)
    tables = page.jpegtables
    header = b"\xff\xd8"
    if photometric == _PHOTOMETRIC_RGB:
        header += _ADOBE_RGB  # TIFF says RGB: JPEG decoders would otherwise assume YCbCr
    if tables:
        tables = bytes(tables)
        if not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
            _not_aligned(reader, "JPEGTables are not an SOI ... EOI stream")
            return None
        header += tables[2:-2]
    out = JpegTilePlan(
        path=str(reader.path),
        level=plan.level,
        tile_size=tw,
        offsets=offsets,
        counts=counts,
        header=header,
    )
    logger.info(
        "%s: %d of %d grid tiles decoded from their JPEG streams (level %d, %d px)",
        reader.path,
        out.n_direct,
        len(offsets),
        plan.level,
        tw,
    )
    return out


def splice(header: bytes, stream: bytes | memoryview) -> bytes:
    """One decodable JPEG: ``header`` (SOI, markers, tables) + the tile stream without its own SOI."""
    return header + bytes(stream[2:]) if header != b"\xff\xd8" else bytes(stream)


def read_streams(plan: JpegTilePlan, fd: int, indices: np.ndarray) -> list[bytes]:
    """Spliced JPEG streams of the direct grid tiles ``indices`` (all must have ``offsets >= 0``).

    Consecutive streams in the file are fetched with one ``pread``.
    """
    idx = np.asarray(indices, dtype=np.int64)
    offs, cnts = plan.offsets[idx], plan.counts[idx]
    if np.any(offs < 0):
        raise ValueError("read_streams got grid tiles without a JPEG stream")
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

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    with warnings.catch_warnings():  # torchvision >= 0.29 flags its image codecs as deprecated
        warnings.simplefilter("ignore")
        dec = decode_jpeg(data, mode=ImageReadMode.RGB, device=torch.device(device))
    return torch.stack(dec).permute(0, 2, 3, 1)


def check_plan(reader: Any, grid: Any, plan: JpegTilePlan, device: Any, n: int = 4) -> str | None:
    """Decode up to ``n`` direct tiles on ``device`` and compare with the reader; None if they agree.

    Catches colour-space surprises (e.g. RGB JPEG data mislabelled) before a whole slide is encoded.
    Returns a reason string when they differ by more than JPEG decoder rounding.
    """
    from wsi_llava.slide.tiling import read_tiles

    direct = np.flatnonzero(plan.offsets >= 0)
    if direct.size == 0:
        return "no grid tile is a whole JPEG tile"
    pick = direct[np.linspace(0, direct.size - 1, min(n, direct.size)).astype(np.int64)]
    fd = os.open(plan.path, os.O_RDONLY)
    try:
        fast = decode_streams(read_streams(plan, fd, pick), device).cpu().numpy()
    except Exception as e:  # noqa: BLE001 - any decoder failure means: use the reader
        return f"decoding failed: {type(e).__name__}: {e}"
    finally:
        os.close(fd)
    ref = read_tiles(reader, grid, pick)
    if fast.shape != ref.shape:
        return f"decoded tiles are {fast.shape[1:]}, the reader gives {ref.shape[1:]}"
    diff = np.abs(fast.astype(np.int16) - ref.astype(np.int16))
    # decoders differ in IDCT and chroma upsampling by a few levels; a wrong colour space by tens
    if float(diff.mean()) > 2.0 or int(np.percentile(diff, 99.9)) > 24:
        return f"decoded tiles differ from the reader's (mean {diff.mean():.2f}, max {diff.max()})"
    return None
