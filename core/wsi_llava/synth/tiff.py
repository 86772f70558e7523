"""Pyramidal tiled JPEG TIFF writer fed by row strips (bounded memory), written atomically.

Levels are top-level pages (reduced ones with ``subfiletype=1``), 256-px tiles, resolution in
CENTIMETER so OpenSlide (generic-tiff) and tifffile both read µm/px.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from wsi_llava.atomic import atomic_path
from wsi_llava.errors import WsiLlavaError

TILE = 256


def _halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    v = img[0:h:2, 0:w:2].astype(np.uint16)
    v += img[1:h:2, 0:w:2]
    v += img[0:h:2, 1:w:2]
    v += img[1:h:2, 1:w:2]
    v += 2
    v >>= 2
    return v.astype(np.uint8)


def write_pyramid(
    path: Path,
    width: int,
    height: int,
    strip: Callable[[int, int], np.ndarray],
    mpp: float,
    quality: int = 90,
    on_strip: Callable[[int, int], None] | None = None,
) -> int:
    """Write a pyramid whose level 0 comes from ``strip(y0, y1)`` (RGB uint8 rows); returns level count.

    Only level 1 (a quarter of level 0) is held in memory besides one strip.
    """
    import tifffile

    if width % 2 or height % 2:
        raise WsiLlavaError(f"synthetic slide size {width}x{height}: width and height must be even")
    level1 = np.zeros((height // 2, width // 2, 3), np.uint8)
    n_strips = -(-height // TILE)

    def tiles() -> Iterator[np.ndarray]:
        for s in range(n_strips):
            y0, y1 = s * TILE, min(height, (s + 1) * TILE)
            rows = strip(y0, y1)
            level1[y0 // 2 : y1 // 2] = _halve(rows)
            padded = np.zeros((TILE, -(-width // TILE) * TILE, 3), np.uint8)
            padded[: y1 - y0, :width] = rows
            for x0 in range(0, width, TILE):
                yield padded[:, x0 : x0 + TILE]
            if on_strip is not None:
                on_strip(s + 1, n_strips)

    path.parent.mkdir(parents=True, exist_ok=True)
    levels = 1
    with (
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 3_500_000_000) as tw,
    ):
        kw = dict(
            tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": quality}
        )
        r = 1e4 / mpp
        tw.write(
            tiles(),
            shape=(height, width, 3),
            dtype=np.uint8,
            resolution=(r, r),
            resolutionunit="CENTIMETER",
            subfiletype=0,
            metadata=None,
            **kw,
        )
        img = level1
        ds = 2
        while True:
            tw.write(
                img,
                resolution=(r / ds, r / ds),
                resolutionunit="CENTIMETER",
                subfiletype=1,
                metadata=None,
                **kw,
            )
            levels += 1
            if max(img.shape[:2]) < 1024 or min(img.shape[:2]) < 2:
                break
            img = _halve(img)
            ds *= 2
    return levels
