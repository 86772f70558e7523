"""Tissue detection on a thumbnail: stained or dark pixels against the bright glass background."""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

#: below this saturation (0..1) a pixel is never tissue by colour: glass, white background, JPEG noise
MIN_SATURATION = 0.07
#: above this brightness (0..1) a pixel is never tissue by darkness
MAX_DARK_BRIGHTNESS = 0.85
#: below this brightness a pixel is a scanner border or an empty black area, not tissue
BLACK_BRIGHTNESS = 0.06


def _otsu(values: np.ndarray, floor: float, ceiling: float) -> float:
    """Otsu's threshold (0..1) of uint8 ``values`` clipped to ``[floor, ceiling]`` (``ceiling`` if flat)."""
    from skimage.filters import threshold_otsu

    counts = np.bincount(values.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    if present.size < 2:
        return ceiling
    t = threshold_otsu(hist=(counts, np.arange(256))) / 255.0
    return float(np.clip(t, floor, ceiling))


def tissue_mask(
    thumb: np.ndarray, min_object_fraction: float = 5e-4, max_hole_fraction: float = 2e-3
) -> np.ndarray:
    """Boolean tissue mask of an RGB ``uint8`` thumbnail.

    A pixel is tissue when its saturation exceeds Otsu's threshold (at least ``MIN_SATURATION``) or
    it is darker than Otsu's brightness threshold (at most ``MAX_DARK_BRIGHTNESS``), and it is not
    near-black. Specks smaller than ``min_object_fraction`` of the image are removed and holes
    smaller than ``max_hole_fraction`` filled, so the mask follows tissue pieces, not dust.
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    if thumb.ndim != 3 or thumb.shape[-1] < 3:
        raise ValueError(f"tissue_mask expects an RGB image (h, w, 3), got shape {thumb.shape}")
    rgb = thumb[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    # saturation (max - min) / max and brightness, both as 0..255 integers: no float image copies
    cmax = rgb.max(axis=-1)
    cmin = rgb.min(axis=-1)
    sat16 = np.zeros(cmax.shape, np.uint16)
    np.floor_divide((cmax - cmin).astype(np.uint16) * 255, cmax, out=sat16, where=cmax > 0)
    sat = sat16.astype(np.uint8)
    del sat16, cmin
    brightness = (rgb.sum(axis=-1, dtype=np.uint16) // 3).astype(np.uint8)
    not_black = brightness > np.uint8(math.floor(BLACK_BRIGHTNESS * 255))
    # thresholds come from the non-black pixels only, so black borders do not skew them
    sat_t = _otsu(sat[not_black], MIN_SATURATION, 1.0)
    dark_t = _otsu(brightness[not_black], 0.0, MAX_DARK_BRIGHTNESS)
    # integer pixels: v > t  <=>  v > floor(t);  v < t  <=>  v < ceil(t)
    mask = sat > np.uint8(min(255, math.floor(sat_t * 255)))
    mask |= brightness < np.uint8(math.ceil(dark_t * 255))
    mask &= not_black
    area = mask.size
    max_object = max(1, int(min_object_fraction * area))
    max_hole = max(1, int(max_hole_fraction * area))
    mask = remove_small_objects(mask, max_size=max_object)
    mask = remove_small_holes(mask, max_size=max_hole)
    logger.debug(
        "tissue mask: saturation > %.3f or brightness < %.3f -> %.1f%% tissue",
        sat_t,
        dark_t,
        100 * mask.mean(),
    )
    return mask
