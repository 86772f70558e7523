"""Tissue-like 256-px tiles and the pyramid levels built from them, for the benchmarks' generated slides.

A slide is a ``layout`` of pool indices (-1: white background); level 0 is written tile by tile from the
pool, each lower level is the same layout at downsample ``ds``. Shared by ``bench_cohort.py`` and
``bench_paper_model_cli.py``, so that both benchmarks read the same kind of tissue.
"""

from __future__ import annotations

import numpy as np

TILE = 256
#: the grey-white of glass without tissue
BACKGROUND = 242


def tile_pool(seed: int, n: int = 24) -> np.ndarray:
    """``n`` tissue-like 256-px tiles (pink/purple with noise and dark nuclei), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    tiles = np.empty((n, TILE, TILE, 3), np.uint8)
    for i in range(n):
        base = rng.uniform([150, 80, 150], [235, 160, 200])
        coarse = rng.normal(0, 10, (TILE // 16, TILE // 16, 3))
        img = base + np.kron(coarse, np.ones((16, 16, 1))) + rng.normal(0, 4, (TILE, TILE, 3))
        for cx, cy, r in zip(
            rng.integers(0, TILE, 30), rng.integers(0, TILE, 30), rng.integers(3, 8, 30), strict=True
        ):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (80, 40, 110)
        tiles[i] = np.clip(img, 0, 255).astype(np.uint8)
    return tiles


def downsampled(pool: np.ndarray, layout: np.ndarray, ds: int) -> np.ndarray:
    """The whole slide at downsample ``ds`` (each tile's mean over ds x ds blocks)."""
    t = TILE // ds
    small = pool.reshape(len(pool), t, ds, t, ds, 3).mean(axis=(2, 4)).astype(np.uint8)
    white = np.full((t, t, 3), BACKGROUND, np.uint8)
    rows = [np.concatenate([small[i] if i >= 0 else white for i in row], axis=1) for row in layout]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))
