"""Small pyramidal TIFFs written with tifffile alone, for the slide-reading and extraction tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_pyramid(path: Path, level0: np.ndarray, mpp: float, n_levels: int = 3, **compression: Any) -> Path:
    """``level0`` and its successive 2x means as a 256-px tiled RGB pyramid at ``mpp`` µm/px.

    ``compression``: tifffile's own arguments (``compression="zlib"``, ``compressionargs={"level": 90}``).
    """
    import tifffile

    levels = [level0]
    for _ in range(n_levels - 1):
        p = levels[-1]
        h, w = p.shape[:2]
        levels.append(p.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            r = 1e4 / (mpp * 2**i)
            tw.write(
                lv,
                tile=(256, 256),
                photometric="rgb",
                **compression,
                resolution=(r, r),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path
