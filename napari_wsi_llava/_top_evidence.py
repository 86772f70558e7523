"""Top evidence: an answer's most relevant tiles, their thumbnails and the camera view that shows one.

Pure logic (numpy, no Qt): the dock's list (:mod:`napari_wsi_llava._evidence_list`) calls it. Thumbnails
are read from the image layer's own pyramid (what the viewer shows), so they work for any multiscale
or single-level layer whose data coordinates are level-0 pixels, whichever reader opened the slide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_llava.answer import Evidence
from wsi_llava.slide.coords import level0_to_napari

logger = logging.getLogger(__name__)

#: how many tiles the list shows
TOP_N = 8
#: thumbnail edge in screen pixels
THUMB = 64
#: a focused tile spans 1/TILES_ACROSS of the canvas' shorter side
TILES_ACROSS = 4


@dataclass(frozen=True)
class TopTile:
    """One listed tile: its rank (1 = most relevant), grid index, level-0 top-left, edge and relevance."""

    rank: int
    tile_index: int
    xy: tuple[int, int]
    tile: int
    score: float

    @property
    def label(self) -> str:
        """``"rank · relevance %"`` as the list shows it."""
        return f"{self.rank} · {self.score * 100:.1f} %"

    @property
    def center_data(self) -> tuple[float, float]:
        """The tile's centre in level-0 data coordinates ``(x, y)`` (napari puts pixel centres on integers)."""
        half = self.tile / 2.0 - 0.5
        return self.xy[0] + half, self.xy[1] + half


def top_tiles(evidence: Evidence, n: int = TOP_N) -> list[TopTile]:
    """The ``n`` tiles of ``evidence`` with the highest positive relevance, most relevant first.

    Ties keep the evidence's order; an evidence without coordinates (evidence off, precomputed tokens)
    gives an empty list.
    """
    tile = int(evidence.tile_size)
    if tile <= 0 or not evidence.coords or n <= 0:
        return []
    scores = np.asarray(evidence.scores, dtype=np.float64)
    count = min(len(scores), len(evidence.coords))
    scores = scores[:count]
    order = [int(i) for i in np.argsort(-scores, kind="stable") if np.isfinite(scores[i]) and scores[i] > 0]
    indices = list(evidence.tile_indices) if len(evidence.tile_indices) >= count else list(range(count))
    return [
        TopTile(
            rank=rank,
            tile_index=int(indices[i]),
            xy=(int(evidence.coords[i][0]), int(evidence.coords[i][1])),
            tile=tile,
            score=float(scores[i]),
        )
        for rank, i in enumerate(order[:n], start=1)
    ]


def layer_levels(layer: Any) -> list[Any]:
    """The pyramid of an image layer, largest first (a single-level layer is a pyramid of one)."""
    data = layer.data
    return list(data) if getattr(layer, "multiscale", False) else [data]


def _spatial(arr: Any, rgb: bool) -> Any:
    """``arr`` with leading (t, z, …) axes indexed at 0, leaving ``(y, x[, c])``."""
    keep = 3 if rgb else 2
    while arr.ndim > keep:
        arr = arr[0]
    return arr


def _to_rgb8(block: np.ndarray, rgb: bool) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 view of a crop: grey repeated, alpha dropped, other depths rescaled."""
    block = np.asarray(block)
    if not rgb:
        block = np.repeat(block[..., None], 3, axis=-1)
    block = block[..., :3]
    if block.dtype != np.uint8:
        top = np.iinfo(block.dtype).max if np.issubdtype(block.dtype, np.integer) else 1.0
        block = np.clip(block.astype(np.float64) / top * 255.0, 0, 255).round().astype(np.uint8)
    return block


def tile_thumbnail(
    levels: Sequence[Any], xy: tuple[int, int], tile: int, size: int = THUMB, rgb: bool = True
) -> np.ndarray:
    """The level-0 square ``(x, y, tile)`` as an ``(size, size, 3)`` uint8 image.

    Read from the coarsest level that still has ``size`` pixels across the tile (one small read),
    box-resized to ``size``; the part of an edge tile beyond the slide is white, as the model saw it.
    """
    from PIL import Image

    base = _spatial(levels[0], rgb)
    h0, w0 = int(base.shape[0]), int(base.shape[1])
    chosen, ds = base, (1.0, 1.0)
    for level in levels[1:]:
        arr = _spatial(level, rgb)
        dy, dx = h0 / int(arr.shape[0]), w0 / int(arr.shape[1])
        if tile / max(dy, dx) < size:
            break
        chosen, ds = arr, (dy, dx)
    x, y = xy
    lx0, ly0 = int(np.floor(x / ds[1])), int(np.floor(y / ds[0]))
    lx1 = max(lx0 + 1, int(np.ceil((x + tile) / ds[1])))
    ly1 = max(ly0 + 1, int(np.ceil((y + tile) / ds[0])))
    out = np.full((ly1 - ly0, lx1 - lx0, 3), 255, np.uint8)
    h, w = int(chosen.shape[0]), int(chosen.shape[1])
    cx0, cy0, cx1, cy1 = max(lx0, 0), max(ly0, 0), min(lx1, w), min(ly1, h)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = _to_rgb8(chosen[cy0:cy1, cx0:cx1], rgb)
    if out.shape[:2] != (size, size):
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.Resampling.BOX))
    return np.ascontiguousarray(out)


def tile_view(
    tile: TopTile,
    image_scale: Sequence[float],
    image_translate: Sequence[float],
    canvas_size: Sequence[float],
    tiles_across: float = TILES_ACROSS,
) -> tuple[tuple[float, float], float]:
    """``(centre (y, x) in world coordinates, zoom)`` that centres ``tile`` with ``tiles_across`` tiles
    over the canvas' shorter side; ``canvas_size`` is ``(h, w)`` screen pixels, zoom is pixels per world unit.
    """
    (cy, cx) = level0_to_napari([tile.center_data], image_scale=image_scale, image_translate=image_translate)[
        0
    ]
    sy, sx = (abs(float(s)) for s in image_scale[-2:])
    ch, cw = (float(v) for v in canvas_size[-2:])
    zoom = min(ch / (tiles_across * tile.tile * sy), cw / (tiles_across * tile.tile * sx))
    return (float(cy), float(cx)), float(zoom)


def iter_thumbnails(
    levels: Sequence[Any], tiles: Sequence[TopTile], rgb: bool = True, size: int = THUMB
) -> Iterator[tuple[int, np.ndarray | None]]:
    """Yield ``(rank, thumbnail)`` per tile, for a thread worker; an unreadable tile yields ``None``.

    A read can fail while the slide's file closes under it (its layer removed): the list keeps the
    placeholder and the others still come.
    """
    for t in tiles:
        try:
            thumb: np.ndarray | None = tile_thumbnail(levels, t.xy, t.tile, size=size, rgb=rgb)
        except Exception as e:  # any reader's failure: this tile's placeholder stays
            logger.warning("cannot read the thumbnail of tile %d at %s: %s", t.tile_index, t.xy, e)
            thumb = None
        yield t.rank, thumb


def _camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _canvas_size(viewer: Any) -> tuple[float, float]:
    """The canvas ``(h, w)`` in screen pixels (``viewer.canvas.size`` from napari 0.9, ``_canvas_size`` before)."""
    canvas = getattr(viewer, "canvas", None)
    size = canvas.size if canvas is not None else viewer._canvas_size
    return float(size[-2]), float(size[-1])


def focus_tile(viewer: Any, image: Any, tile: TopTile, tiles_across: float = TILES_ACROSS) -> None:
    """Centre ``viewer`` on ``tile`` of the slide layer ``image``, zoomed to ``tiles_across`` tiles."""
    centre, zoom = tile_view(tile, image.scale, image.translate, _canvas_size(viewer), tiles_across)
    camera = _camera(viewer)
    camera.center = (*tuple(camera.center)[:-2], *centre)
    camera.zoom = zoom
