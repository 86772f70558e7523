"""Evidence overlay: per-tile relevance of an answer as a heat map aligned with the slide.

One heat-map pixel per tile of the slide's tile grid. napari puts a pixel's centre at its integer
data coordinate, so the map is translated by half a tile (minus half a level-0 pixel) to cover the
same level-0 area as its tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from wsi_llava.answer import Evidence

LAYER_NAME = "WSI-LLaVA evidence"


def evidence_heatmap(
    evidence: Evidence, dimensions: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int], int]:
    """``(heat (rows, cols) float32, origin (x, y) level-0, tile)`` covering a ``(w, h)`` slide.

    Scores are scaled so the most relevant tile is 1; tiles without evidence are 0 (an answer asked
    without evidence gives a blank map, so no earlier answer's map stays on show).
    """
    tile = int(evidence.tile_size)
    w, h = int(dimensions[0]), int(dimensions[1])
    if tile <= 0:  # no tile grid (precomputed visual tokens)
        return np.zeros((1, 1), np.float32), (0, 0), 1
    coords = np.asarray(evidence.coords, dtype=np.int64).reshape(-1, 2)
    origin = tuple(int(v) for v in coords.min(axis=0) % tile) if len(coords) else (0, 0)
    cols = -(-(w - origin[0]) // tile)
    rows = -(-(h - origin[1]) // tile)
    heat = np.zeros((max(rows, 1), max(cols, 1)), np.float32)
    cells = (coords - np.asarray(origin)) // tile
    scores = np.asarray(evidence.scores, dtype=np.float32)
    ok = (
        (cells[:, 0] >= 0)
        & (cells[:, 1] >= 0)
        & (cells[:, 0] < heat.shape[1])
        & (cells[:, 1] < heat.shape[0])
    )
    heat[cells[ok, 1], cells[ok, 0]] = scores[ok]
    top = float(heat.max())
    if top > 0:
        heat /= top
    return heat, (origin[0], origin[1]), tile


def evidence_layer_kwargs(
    origin: tuple[int, int],
    tile: int,
    image_scale: Sequence[float],
    image_translate: Sequence[float],
    opacity: float = 0.6,
) -> dict[str, Any]:
    """Image-layer keyword arguments placing a heat map of ``tile``-px cells over the slide."""
    from napari.utils.colormaps import Colormap

    sy, sx = (float(s) for s in image_scale[-2:])
    ty, tx = (float(t) for t in image_translate[-2:])
    half = tile / 2.0 - 0.5
    colormap = Colormap(
        colors=[[1.0, 1.0, 0.0, 0.0], [1.0, 0.8, 0.0, 0.55], [1.0, 0.0, 0.0, 1.0]],
        controls=[0.0, 0.35, 1.0],
        name="wsi-llava-evidence",
    )
    return {
        "name": LAYER_NAME,
        "scale": (tile * sy, tile * sx),
        "translate": (ty + (origin[1] + half) * sy, tx + (origin[0] + half) * sx),
        "colormap": colormap,
        "contrast_limits": (0.0, 1.0),
        "opacity": opacity,
        "blending": "translucent",
        "interpolation2d": "nearest",
    }
