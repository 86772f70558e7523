"""napari ``(y, x)`` layer coordinates <-> level-0 slide pixels ``(x, y)``: the one place the axes swap.

napari maps a layer's data coordinates to world coordinates as ``world = data * scale + translate``
(per axis, ``(y, x)`` order). A slide image layer has level-0 pixels as its data coordinates, so
level-0 ``(y, x)`` = ``(world - image_translate) / image_scale``. Pure numpy: no napari import.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_llava.errors import RegionError

Pair = Sequence[float] | np.ndarray


def _pair(value: Pair, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size < 2:
        raise RegionError(f"{name} must have (y, x) entries, got {value!r}")
    arr = arr[-2:]  # napari layers may carry leading (t, z, ...) axes: the last two are (y, x)
    if not np.isfinite(arr).all():
        raise RegionError(f"{name} must be finite numbers, got {value!r}")
    return arr


def _points(points: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise RegionError(f"{name} must be an (N, 2) array of vertices, got shape {arr.shape}")
    return arr[:, -2:]


def napari_to_level0(
    points_yx: np.ndarray | Sequence[Sequence[float]],
    layer_scale: Pair = (1.0, 1.0),
    layer_translate: Pair = (0.0, 0.0),
    image_scale: Pair = (1.0, 1.0),
    image_translate: Pair = (0.0, 0.0),
) -> np.ndarray:
    """Vertices ``(N, 2)`` in a napari layer's data coordinates ``(y, x)`` -> level-0 pixels ``(x, y)``.

    ``layer_*`` is the transform of the layer holding the points, ``image_*`` that of the slide image
    layer (whose data coordinates are level-0 pixels); only the last two axes are used.
    """
    pts = _points(points_yx, "napari vertices")
    ls, lt = _pair(layer_scale, "layer scale"), _pair(layer_translate, "layer translate")
    im_s, im_t = _pair(image_scale, "image scale"), _pair(image_translate, "image translate")
    if (im_s == 0).any():
        raise RegionError(f"image scale must be non-zero, got {tuple(im_s)}")
    level0_yx = (pts * ls + lt - im_t) / im_s
    return level0_yx[:, ::-1].copy()


def level0_to_napari(
    points_xy: np.ndarray | Sequence[Sequence[float]],
    layer_scale: Pair = (1.0, 1.0),
    layer_translate: Pair = (0.0, 0.0),
    image_scale: Pair = (1.0, 1.0),
    image_translate: Pair = (0.0, 0.0),
) -> np.ndarray:
    """Level-0 pixels ``(x, y)`` -> a napari layer's data coordinates ``(y, x)`` (inverse of the above)."""
    pts = _points(points_xy, "level-0 vertices")
    ls, lt = _pair(layer_scale, "layer scale"), _pair(layer_translate, "layer translate")
    im_s, im_t = _pair(image_scale, "image scale"), _pair(image_translate, "image translate")
    if (ls == 0).any():
        raise RegionError(f"layer scale must be non-zero, got {tuple(ls)}")
    world = pts[:, ::-1] * im_s + im_t
    return (world - lt) / ls
