"""Tile grids at a target µm/px and fast, memory-bounded batched tile reading.

A ``TileGrid`` holds level-0 top-left corners of square tiles that each cover ``tile_size`` pixels at
``target_mpp`` (``tile_size_level0`` pixels at level 0), in row-major order, tissue tiles only.
``iter_tile_batches`` reads them from the pyramid level closest to the target resolution, one
``read_region`` call per run of adjacent tiles, in a small thread pool with a bounded prefetch window.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsi_llava.errors import RegionError, SlideError
from wsi_llava.progress import CancelToken
from wsi_llava.slide.base import PLAUSIBLE_MPP, BaseSlideReader
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

#: longest strip (pixels at the read level) fetched with one ``read_region`` call
MAX_RUN_PIXELS = 4096
#: the most grid cells a slide may have: far above any real slide at its µm/px (a 200k x 200k px scan at
#: 0.25 µm/px has ~150k cells of 256 px at 0.5 µm/px); more means a wrong µm/px, not a big slide
MAX_TILES = 2_000_000
#: the largest tile edge (pixels at the target resolution) a grid may ask for
MAX_TILE_SIZE = 4096


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Level-0 top-left corners (N×2 int32, row-major) of tiles of ``tile_size`` px at ``target_mpp``."""

    coords: np.ndarray
    tile_size: int
    target_mpp: float
    tile_size_level0: int
    slide_dimensions: tuple[int, int]
    slide_mpp: float

    def __post_init__(self) -> None:
        coords = np.ascontiguousarray(np.asarray(self.coords, dtype=np.int32).reshape(-1, 2))
        coords.setflags(write=False)
        object.__setattr__(self, "coords", coords)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def centers(self) -> np.ndarray:
        """Level-0 tile centres, N×2 float64."""
        return self.coords.astype(np.float64) + self.tile_size_level0 / 2.0


def _tile_size_level0(tile_size: int, target_mpp: float, slide_mpp: float) -> int:
    return max(1, round(tile_size * target_mpp / slide_mpp))


def tissue_fractions(
    mask: np.ndarray, coords: np.ndarray, tile_size_level0: int, dims: tuple[int, int]
) -> np.ndarray:
    """Fraction of each tile's footprint that is tissue in ``mask`` (a whole-slide boolean mask)."""
    mh, mw = mask.shape
    w0, h0 = dims
    sx, sy = mw / w0, mh / h0
    acc = np.int32 if mask.size < 2**31 else np.int64  # a summed-area table, as small as it can be
    integral = np.zeros((mh + 1, mw + 1), dtype=acc)
    np.cumsum(mask, axis=0, dtype=acc, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    x0 = np.clip(np.round(coords[:, 0] * sx).astype(np.int64), 0, mw - 1)
    y0 = np.clip(np.round(coords[:, 1] * sy).astype(np.int64), 0, mh - 1)
    x1 = np.maximum(x0 + 1, np.round((coords[:, 0] + tile_size_level0) * sx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((coords[:, 1] + tile_size_level0) * sy).astype(np.int64))
    area = (x1 - x0) * (y1 - y0)  # the full footprint: parts beyond the slide edge count as background
    x1c, y1c = np.minimum(x1, mw), np.minimum(y1, mh)
    tissue = integral[y1c, x1c].astype(np.int64) - integral[y0, x1c] - integral[y1c, x0] + integral[y0, x0]
    return tissue / area


def overview(reader: BaseSlideReader, max_size: int = 2048, max_pixels: int = 1 << 24) -> np.ndarray:
    """The whole slide as RGB with its longer side at most ``max_size`` px, in bounded memory.

    Like ``reader.thumbnail``, but when the nearest pyramid level is big (a slide with few or no
    reduced levels) it is read in horizontal bands of at most ``max_pixels`` level pixels.
    """
    from PIL import Image

    w0, h0 = reader.dimensions
    scale = max(max(w0, h0) / max_size, 1.0)
    level = reader.best_level_for_downsample(scale)
    lw, lh = reader.level_dimensions[level]
    if lw * lh <= max_pixels:
        return reader.thumbnail(max_size)
    ds = float(reader.level_downsamples[level])
    tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    out = np.empty((th, tw, 3), np.uint8)
    band = max(1, (max_pixels // lw) * th // lh)  # output rows per band
    for oy0 in range(0, th, band):
        oy1 = min(th, oy0 + band)
        ly0 = math.floor(oy0 * lh / th)
        ly1 = max(ly0 + 1, min(lh, math.ceil(oy1 * lh / th)))
        strip = reader.read_region((0, round(ly0 * ds)), level, (lw, ly1 - ly0))
        out[oy0:oy1] = np.asarray(Image.fromarray(strip).resize((tw, oy1 - oy0), Image.Resampling.BOX))
    return out


def make_tile_grid(
    reader: BaseSlideReader,
    target_mpp: float = 0.5,
    tile_size: int = 256,
    min_tissue: float = 0.25,
    mask: np.ndarray | None = None,
) -> TileGrid:
    """Tiles of ``tile_size`` px at ``target_mpp`` covering the slide, keeping those with enough tissue.

    Tissue is measured on ``mask`` (a boolean mask of the whole slide at any resolution) or, when
    none is given, on :func:`~wsi_llava.slide.tissue.tissue_mask` of a thumbnail. ``min_tissue=0``
    keeps every tile. Edge tiles that extend past the slide are kept (they read as white there).
    """
    if not 1 <= tile_size <= MAX_TILE_SIZE:
        raise SlideError(
            f"{reader.path}: tile size must be 1..{MAX_TILE_SIZE} pixels (--tile-size), got {tile_size}"
        )
    lo, hi = PLAUSIBLE_MPP
    if not (target_mpp > 0 and math.isfinite(target_mpp)) or not lo <= target_mpp <= hi:
        raise SlideError(
            f"{reader.path}: target µm/px (--target-mpp) must lie in {lo:g}–{hi:g}, got {target_mpp!r}"
        )
    slide_mpp = reader.mpp  # raises SlideError naming --mpp when unknown
    if slide_mpp > target_mpp * 1.1:
        logger.warning(
            "%s: the slide (%.3g µm/px) is coarser than the target %.3g µm/px; tiles will be upsampled",
            reader.path,
            slide_mpp,
            target_mpp,
        )
    t0 = _tile_size_level0(tile_size, target_mpp, slide_mpp)
    w0, h0 = reader.dimensions
    cells = -(-w0 // t0) * -(-h0 // t0)
    if cells > MAX_TILES:
        raise SlideError(
            f"{reader.path}: {w0}x{h0} px at {slide_mpp:.4g} µm/px would make {cells:,} tiles of {tile_size} px at "
            f"{target_mpp:g} µm/px, over the limit of {MAX_TILES:,}: check the slide's µm/px (--mpp)"
        )
    xs = np.arange(0, w0, t0, dtype=np.int64)
    ys = np.arange(0, h0, t0, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    if min_tissue > 0 and len(coords):
        if mask is None:
            from wsi_llava.slide.tissue import tissue_mask

            tiles_long = max(w0, h0) / t0
            thumb_size = int(np.clip(6 * tiles_long, 1024, 2048))  # >= ~5 mask px per tile side
            mask = tissue_mask(overview(reader, thumb_size, max_pixels=1 << 20))
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or mask.size == 0:
            raise SlideError(
                f"{reader.path}: tissue mask must be a non-empty 2-D array, got shape {mask.shape}"
            )
        keep = tissue_fractions(mask, coords, t0, (w0, h0)) >= min_tissue
        coords = coords[keep]
    if np.any(coords > np.iinfo(np.int32).max):
        raise SlideError(f"{reader.path}: slide of {w0}x{h0} px is too large for int32 tile coordinates")
    logger.info(
        "%s: %d tiles of %d px at %.3g µm/px (%d px at level 0)",
        reader.path,
        len(coords),
        tile_size,
        target_mpp,
        t0,
    )
    return TileGrid(
        coords=coords.astype(np.int32),
        tile_size=int(tile_size),
        target_mpp=float(target_mpp),
        tile_size_level0=int(t0),
        slide_dimensions=(int(w0), int(h0)),
        slide_mpp=float(slide_mpp),
    )


def select_tiles(grid: TileGrid, region: Region, source: str = "region") -> np.ndarray:
    """Indices (row-major, int64) of grid tiles whose centre lies in ``region``.

    A region smaller than a tile that contains no tile centre gets the tiles it overlaps.
    """
    w0, h0 = grid.slide_dimensions
    region.check_within(w0, h0, source)
    if len(grid) == 0:
        raise RegionError(f"{source}: region contains no tissue tiles (the slide has none)")
    centers = grid.centers
    inside = region.contains(centers[:, 0], centers[:, 1])
    idx = np.flatnonzero(inside)
    if idx.size:
        return idx.astype(np.int64)
    # fallback for small regions: tiles overlapping the region's bounding box that touch the polygon
    t = grid.tile_size_level0
    xmin, ymin, xmax, ymax = region.bounds
    c = grid.coords.astype(np.float64)
    boxed = np.flatnonzero((c[:, 0] < xmax) & (c[:, 0] + t > xmin) & (c[:, 1] < ymax) & (c[:, 1] + t > ymin))
    pts = np.asarray(region.points)
    hits = []
    for i in boxed:
        x, y = c[i]
        vertex_in = np.any((pts[:, 0] >= x) & (pts[:, 0] < x + t) & (pts[:, 1] >= y) & (pts[:, 1] < y + t))
        corners = np.array([x, x + t, x, x + t]), np.array([y, y, y + t, y + t])
        if vertex_in or region.contains(*corners).any():
            hits.append(i)
    if not hits:
        xmin, ymin, xmax, ymax = region.bounds
        raise RegionError(
            f"{source}: region ({xmin:.0f}, {ymin:.0f})-({xmax:.0f}, {ymax:.0f}) contains no tissue tiles"
        )
    return np.asarray(hits, dtype=np.int64)


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReadPlan:
    level: int
    downsample: float  # of ``level``
    size_at_level: int  # tile side in pixels at ``level``
    resize: bool


def _plan(reader: BaseSlideReader, grid: TileGrid) -> _ReadPlan:
    wanted = grid.tile_size_level0 / grid.tile_size  # level-0 px per output px
    level = reader.best_level_for_downsample(max(wanted, 1.0))
    ds = float(reader.level_downsamples[level])
    size = max(1, round(grid.tile_size_level0 / ds))
    return _ReadPlan(level=level, downsample=ds, size_at_level=size, resize=size != grid.tile_size)


def _runs(coords: np.ndarray, t0: int, max_len: int) -> list[tuple[int, int]]:
    """Split consecutive positions into ``(start, stop)`` runs of horizontally adjacent tiles."""
    n = len(coords)
    if n == 0:
        return []
    adjacent = (coords[1:, 1] == coords[:-1, 1]) & (coords[1:, 0] - coords[:-1, 0] == t0)
    breaks = np.flatnonzero(~adjacent) + 1
    runs = []
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, n], strict=True):
        for s in range(int(start), int(stop), max_len):
            runs.append((s, min(s + max_len, int(stop))))
    return runs


def _resize_tile(tile: np.ndarray, size: int) -> np.ndarray:
    """Square RGB tile to ``size`` px: box filter for exact integer reductions, else bilinear (Pillow)."""
    from PIL import Image

    img = Image.fromarray(tile)
    n = tile.shape[0]
    if n > size and n % size == 0 and tile.shape[1] == n:
        img = img.reduce(n // size)
    else:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def read_tiles(reader: BaseSlideReader, grid: TileGrid, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Tiles ``indices`` of ``grid`` as ``(B, tile_size, tile_size, 3)`` uint8, read run by run."""
    plan = _plan(reader, grid)
    idx = np.asarray(indices, dtype=np.int64)
    coords = grid.coords[idx].astype(np.int64)
    ts, sl = grid.tile_size, plan.size_at_level
    out = np.empty((len(idx), ts, ts, 3), dtype=np.uint8)
    max_len = max(1, MAX_RUN_PIXELS // sl)
    for start, stop in _runs(coords, grid.tile_size_level0, max_len):
        x, y = int(coords[start, 0]), int(coords[start, 1])
        # offsets of each tile inside the strip, at the read level
        offsets = np.floor(coords[start:stop, 0] / plan.downsample).astype(np.int64) - math.floor(
            x / plan.downsample
        )
        strip = reader.read_region((x, y), plan.level, (int(offsets[-1]) + sl, sl))
        for k, off in enumerate(offsets):
            tile = strip[:, off : off + sl]
            out[start + k] = _resize_tile(tile, ts) if plan.resize else tile
    return out


def iter_tile_batches(
    reader: BaseSlideReader,
    grid: TileGrid,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 64,
    workers: int = 2,
    cancel: CancelToken | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(tile indices, uint8 tiles (B, tile_size, tile_size, 3))`` in the order of ``indices``.

    Batches are read ahead by ``workers`` threads; at most ``workers + 1`` batches are in memory
    besides the one being consumed, whatever the slide's size. ``cancel`` raises ``Cancelled``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    idx = (
        np.arange(len(grid), dtype=np.int64)
        if indices is None
        else np.asarray(indices, dtype=np.int64).ravel()
    )
    if idx.size and (idx.min() < 0 or idx.max() >= len(grid)):
        raise RegionError(f"{reader.path}: tile indices must lie in 0..{len(grid) - 1}")
    batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    if not batches:
        return
    workers = max(1, int(workers))
    if workers == 1 and len(batches) == 1:
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield batches[0], read_tiles(reader, grid, batches[0])
        return
    window = workers + 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsi-tiles")
    pending: deque[tuple[np.ndarray, Future]] = deque()
    nxt = 0
    try:
        while nxt < len(batches) or pending:
            while nxt < len(batches) and len(pending) < window:
                if cancel is not None and cancel.cancelled:
                    break
                pending.append((batches[nxt], pool.submit(read_tiles, reader, grid, batches[nxt])))
                nxt += 1
            if cancel is not None:
                cancel.raise_if_cancelled()
            batch_idx, fut = pending.popleft()
            tiles = fut.result()
            if cancel is not None:
                cancel.raise_if_cancelled()
            yield batch_idx, tiles
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
