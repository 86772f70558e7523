"""The evidence picture: a slide thumbnail with the answer's relevance map over it, as a PNG.

One cell per tile of the question, coloured by the tile's relevance (relative to the answer's most
relevant tile, as everywhere: :func:`wsi_llava.evidence_tiles.relative_relevance`) with a perceptual
colour map, and as transparent as it is irrelevant, so tissue the answer ignored shows unchanged. A
region question's outline is drawn over it.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from wsi_llava.answer import Answer, Evidence
from wsi_llava.atomic import atomic_write_bytes, check_writable
from wsi_llava.errors import WsiLlavaError
from wsi_llava.evidence_tiles import relative_relevance
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

#: longest side of the thumbnail in pixels
DEFAULT_MAX_SIZE = 1536
#: perceptually uniform colour map (matplotlib's name)
COLORMAP = "inferno"
#: opacity of the most relevant tile's cell; a cell's opacity is this times its relevance
MAX_ALPHA = 0.75
#: colour of a region question's outline
OUTLINE_RGB = (0, 200, 255)


def relevance_map(evidence: Evidence, size: tuple[int, int], slide_size: tuple[int, int]) -> np.ndarray:
    """Relevance (0..1) per pixel of a ``size`` (w, h) picture of a ``slide_size`` slide: each tile's
    value over its level-0 square, 0 where no tile of the question lies."""
    w, h = size
    out = np.zeros((h, w), np.float32)
    relevance = relative_relevance(evidence)
    tile = int(evidence.tile_size)
    if relevance.size == 0 or tile <= 0:
        return out
    sx, sy = w / slide_size[0], h / slide_size[1]
    coords = np.asarray(evidence.coords, dtype=np.float64).reshape(-1, 2)
    x0 = np.clip(np.round(coords[:, 0] * sx), 0, w).astype(int)
    x1 = np.clip(np.round((coords[:, 0] + tile) * sx), 0, w).astype(int)
    y0 = np.clip(np.round(coords[:, 1] * sy), 0, h).astype(int)
    y1 = np.clip(np.round((coords[:, 1] + tile) * sy), 0, h).astype(int)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))  # >= 1 px a cell
    for i in np.flatnonzero(relevance > 0):
        cell = out[y0[i] : y1[i], x0[i] : x1[i]]
        np.maximum(cell, relevance[i], out=cell)
    return out


def overlay(
    thumbnail: np.ndarray, evidence: Evidence, slide_size: tuple[int, int], region: Region | None = None
) -> np.ndarray:
    """``thumbnail`` (RGB uint8 of the whole slide) with the relevance map and ``region``'s outline over it."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    h, w = thumbnail.shape[:2]
    rel = relevance_map(evidence, (w, h), slide_size)
    colours = colormaps[COLORMAP](rel)[..., :3]
    alpha = (MAX_ALPHA * rel)[..., None]
    blended = thumbnail.astype(np.float32) * (1 - alpha) + colours * 255.0 * alpha
    out = np.where(alpha > 0, np.clip(np.round(blended), 0, 255), thumbnail).astype(np.uint8)
    if region is not None:
        image = Image.fromarray(out)
        draw = ImageDraw.Draw(image)
        sx, sy = w / slide_size[0], h / slide_size[1]
        width = max(2, round(max(w, h) / 600))
        for ring in [region.points, *region.holes]:
            pts = [(x * sx, y * sy) for x, y in ring]
            draw.line(pts + pts[:1], fill=OUTLINE_RGB, width=width, joint="curve")
        out = np.asarray(image)
    return out


def render(reader, answer: Answer, max_size: int = DEFAULT_MAX_SIZE) -> np.ndarray:
    """The evidence picture of ``answer`` on the slide ``reader`` reads (RGB uint8, longest side ``max_size``)."""
    from wsi_llava.slide.tiling import overview

    thumbnail = overview(reader, max_size=max_size)
    return overlay(thumbnail, answer.evidence, reader.dimensions, answer.region)


def check_png_path(path: str | Path) -> None:
    """Raise ``WsiLlavaError`` unless the evidence PNG can be written at ``path`` (before any model work)."""
    try:
        check_writable(path)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
        raise WsiLlavaError(f"{path}: cannot write the evidence PNG: {e.strerror or e}{where}") from None


def write_png(path: str | Path, reader, answer: Answer, max_size: int = DEFAULT_MAX_SIZE) -> Path:
    """Write the evidence picture of ``answer`` to ``path`` as a PNG, atomically (complete, or not at all)."""
    from PIL import Image

    if not answer.evidence.scores:
        logger.warning("%s: the answer carries no evidence; the picture shows the slide only", path)
    buffer = io.BytesIO()
    Image.fromarray(render(reader, answer, max_size)).save(buffer, format="PNG")
    try:
        return atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        raise WsiLlavaError(f"{path}: cannot write the evidence PNG: {e.strerror or e}") from None
