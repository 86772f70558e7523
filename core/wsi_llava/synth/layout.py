"""Slide layout: an irregular tissue section split into class regions of several tiles each.

The layout is computed on a coarse grid (``GRID`` px cells), turned into polygons (level-0 px) and the
polygons are rasterised at 1/``QUARTER`` scale to give the label map the renderer uses. The annotations
(the ground truth a pathologist would draw) are traced from each class's cells less a rim of
``ANNOTATION_INSET`` cells: an annotation covers pixels of its class only, annotations of two classes
lie at least two rims apart (no point, so no tile centre, is in both), and a piece that cannot hold a
whole tile is left unannotated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon
from skimage.measure import approximate_polygon, find_contours
from skimage.measure import label as cc_label

from wsi_llava.errors import WsiLlavaError
from wsi_llava.synth.labels import BACKGROUND, FAT, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR, SlideLabels
from wsi_llava.synth.noise import Noise

GRID = 32  #: layout cell edge, level-0 px
QUARTER = 4  #: the label map is stored at 1/QUARTER of level 0
TILE = 256
ANNOTATION_INSET = 1  #: annotations keep this many layout cells inside their class's pixels

#: relative area of each class on a slide
_WEIGHTS = {TUMOUR: 0.34, STROMA: 0.24, NECROSIS: 0.14, LYMPHOCYTES: 0.14, FAT: 0.14}


@dataclass
class ClassPolygon:
    """One connected region of one class: outer ring and holes, level-0 ``(x, y)`` px."""

    cls: int
    outer: list[tuple[float, float]]
    holes: list[list[tuple[float, float]]] = field(default_factory=list)
    area_cells: int = 0


@dataclass
class Layout:
    """The layout of one slide: class polygons, the quarter-scale label map they rasterise to, annotations."""

    width: int
    height: int
    polygons: list[ClassPolygon]
    label_q: np.ndarray  #: uint8 (ceil(h/4), ceil(w/4)) class ids
    annotations: list[ClassPolygon]
    annotation_q: np.ndarray  #: int32, index into ``annotations`` + 1 (0 = in none)

    def fractions(self) -> dict[int, float]:
        """Area fraction of each class among tissue pixels."""
        counts = np.bincount(self.label_q.ravel(), minlength=6).astype(float)
        tissue = counts[1:].sum()
        return {c: float(counts[c] / tissue) for c in range(1, 6) if counts[c] > 0}


def _section_mask(gw: int, gh: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32) + 0.5
    cx = gw / 2 + rng.uniform(-0.04, 0.04) * gw
    cy = gh / 2 + rng.uniform(-0.04, 0.04) * gh
    rx = gw * rng.uniform(0.40, 0.46)
    ry = gh * rng.uniform(0.40, 0.46)
    theta = np.arctan2((yy - cy) / ry, (xx - cx) / rx)
    r = np.hypot((xx - cx) / rx, (yy - cy) / ry)
    edge = np.ones_like(r)
    for k in range(2, 6):
        edge += rng.uniform(0.0, 0.10 / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    salt = int(rng.integers(1 << 30))
    edge += 0.12 * (Noise(gw, gh).value(xx, yy, max(gw, gh) / 6, salt) - 0.5)
    mask = r < edge
    mask[:1, :] = mask[-1:, :] = False
    mask[:, :1] = mask[:, -1:] = False
    lab = cc_label(mask, connectivity=1)
    if lab.max() > 1:
        mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndi.binary_fill_holes(mask)


def _class_grid(section: np.ndarray, classes: list[int], rng: np.random.Generator) -> np.ndarray:
    gh, gw = section.shape
    cells_per_tile = (TILE // GRID) ** 2
    tissue = int(section.sum())
    k = max(len(classes), round(tissue / (7 * cells_per_tile)))
    ys, xs = np.nonzero(section)
    # farthest-point sampling of seeds over the section, from a random start
    pts = np.stack([xs, ys], 1).astype(np.float32) + 0.5
    chosen = [int(rng.integers(len(pts)))]
    dmin = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dmin * rng.uniform(0.7, 1.0, len(pts))))
        chosen.append(nxt)
        dmin = np.minimum(dmin, np.linalg.norm(pts - pts[nxt], axis=1))
    seeds = pts[chosen]
    w = np.array([_WEIGHTS[c] for c in classes])
    extra = rng.choice(len(classes), size=k - len(classes), p=w / w.sum()) if k > len(classes) else []
    seed_cls = np.array([classes[i] for i in rng.permutation(len(classes))] + [classes[i] for i in extra])
    seed_cls = seed_cls[rng.permutation(k)]
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32) + 0.5
    amp = math.sqrt(tissue / k) * 0.45
    s1, s2 = (int(v) for v in rng.integers(1 << 30, size=2))
    scale = math.sqrt(tissue / k)
    nz = Noise(gw, gh)
    wx = xx + amp * (nz.value(xx, yy, scale, s1) - 0.5) * 2
    wy = yy + amp * (nz.value(xx, yy, scale, s2) - 0.5) * 2
    d = (wx[..., None] - seeds[:, 0]) ** 2 + (wy[..., None] - seeds[:, 1]) ** 2
    grid = seed_cls[np.argmin(d, axis=2)].astype(np.uint8)
    grid[~section] = BACKGROUND
    return _merge_small(grid, min_cells=int(1.5 * cells_per_tile))


def _merge_small(grid: np.ndarray, min_cells: int) -> np.ndarray:
    """Give components smaller than ``min_cells`` to the class that surrounds them most."""
    for _ in range(6):
        changed = False
        for c in np.unique(grid):
            if c == BACKGROUND:
                continue
            lab, n = cc_label(grid == c, connectivity=1, return_num=True)
            if n == 0:
                continue
            sizes = np.bincount(lab.ravel())
            for i in np.nonzero(sizes[1:] < min_cells)[0] + 1:
                comp = lab == i
                ring = ndi.binary_dilation(comp) & ~comp
                neigh = grid[ring]
                neigh = neigh[neigh != BACKGROUND]
                if len(neigh) == 0:
                    continue
                grid[comp] = np.bincount(neigh).argmax()
                changed = True
        if not changed:
            break
    return grid


def _ring(contour: np.ndarray, width: int, height: int) -> list[tuple[float, float]]:
    c = approximate_polygon(contour, tolerance=0.01)
    xs = np.clip((c[:, 1] - 0.5) * GRID, 0, width)
    ys = np.clip((c[:, 0] - 0.5) * GRID, 0, height)
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts = pts[:-1]
    return pts


def _polygons(grid: np.ndarray, width: int, height: int) -> list[ClassPolygon]:
    out: list[ClassPolygon] = []
    for c in sorted(int(v) for v in np.unique(grid) if v != BACKGROUND):
        lab, n = cc_label(grid == c, connectivity=1, return_num=True)
        for i in range(1, n + 1):
            comp = lab == i
            filled = ndi.binary_fill_holes(comp)
            contours = find_contours(np.pad(filled, 1).astype(np.float32), 0.5)
            outer = max(contours, key=len)
            holes_lab, nh = cc_label(filled & ~comp, connectivity=1, return_num=True)
            holes = []
            for j in range(1, nh + 1):
                hc = find_contours(np.pad(holes_lab == j, 1).astype(np.float32), 0.5)
                holes.append(_ring(max(hc, key=len), width, height))
            out.append(ClassPolygon(c, _ring(outer, width, height), holes, int(filled.sum())))
    return out


def _fill(ring: list[tuple[float, float]], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Quarter-scale pixels inside a level-0 ring."""
    p = np.asarray(ring)
    return draw_polygon(p[:, 1] / QUARTER - 0.5, p[:, 0] / QUARTER - 0.5, shape=shape)


def _rasterise(polys: list[ClassPolygon], width: int, height: int) -> np.ndarray:
    """The label map: outer rings filled, largest first, so a hole is painted by the regions inside it."""
    label = np.zeros((-(-height // QUARTER), -(-width // QUARTER)), np.uint8)
    for i in sorted(range(len(polys)), key=lambda i: -polys[i].area_cells):
        label[_fill(polys[i].outer, label.shape)] = polys[i].cls
    return label


def _annotations(grid: np.ndarray, width: int, height: int) -> tuple[list[ClassPolygon], np.ndarray]:
    """Annotation polygons (see the module docstring) and their quarter-scale index map."""
    rim = np.ones((2 * ANNOTATION_INSET + 1,) * 2, bool)
    tile = np.ones((TILE // GRID,) * 2, bool)
    inner = np.zeros_like(grid)
    for c in (int(v) for v in np.unique(grid) if v != BACKGROUND):
        core = ndi.binary_erosion(grid == c, structure=rim, border_value=0)
        holds_tile = ndi.binary_erosion(core, structure=tile, border_value=0)
        inner[ndi.binary_propagation(holds_tile, mask=core)] = c  # the pieces that hold a whole tile
    anns = _polygons(inner, width, height)
    index = np.zeros((-(-height // QUARTER), -(-width // QUARTER)), np.int32)
    for i, a in enumerate(anns):
        index[_fill(a.outer, index.shape)] = i + 1
        for hole in a.holes:
            rr, cc = _fill(hole, index.shape)
            index[rr, cc] = np.where(index[rr, cc] == i + 1, 0, index[rr, cc])
    return anns, index


def make_layout(labels: SlideLabels, width: int, height: int, rng: np.random.Generator) -> Layout:
    """Draw a section and class regions until every class of ``labels`` has a whole tile of its own."""
    gw, gh = -(-width // GRID), -(-height // GRID)
    need = 3 * TILE // (2 * GRID)  # every class holds a 384-px square
    for _attempt in range(30):
        section = _section_mask(gw, gh, rng)
        grid = _class_grid(section, labels.classes, rng)
        ok = True
        for c in labels.classes:
            core = ndi.binary_erosion(grid == c, structure=np.ones((need, need), bool), border_value=0)
            if not core.any():
                ok = False
                break
        if ok:
            polys = _polygons(grid, width, height)
            anns, annotation_q = _annotations(grid, width, height)
            return Layout(width, height, polys, _rasterise(polys, width, height), anns, annotation_q)
    raise WsiLlavaError(
        f"synthetic slide {width}x{height} px is too small to hold {len(labels.classes)} tissue classes "
        "with a 384-px square each; use a size of at least 2048x2048"
    )


def find_rectangle(
    layout: Layout, annotation: int, size: tuple[int, int], rng: np.random.Generator, margin: int = 16
) -> tuple[int, int, int, int] | None:
    """A random level-0 rectangle ``(x, y, w, h)`` of ``size`` lying wholly in one annotation (+ margin)."""
    w, h = size
    m = QUARTER * math.ceil(margin / QUARTER)
    inside = (layout.annotation_q == annotation + 1).astype(np.int32)
    qw, qh = (w + 2 * m) // QUARTER, (h + 2 * m) // QUARTER
    ii = np.pad(inside.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    if ii.shape[0] <= qh or ii.shape[1] <= qw:
        return None
    win = ii[qh:, qw:] - ii[:-qh, qw:] - ii[qh:, :-qw] + ii[:-qh, :-qw]
    ys, xs = np.nonzero(win == qw * qh)
    if len(ys) == 0:
        return None
    k = int(rng.integers(len(ys)))
    return int(xs[k] * QUARTER + m), int(ys[k] * QUARTER + m), int(w), int(h)
