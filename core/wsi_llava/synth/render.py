"""H&E-like rendering of a slide layout, strip by strip.

Each class texture gives two stain densities per pixel, haematoxylin (nuclei, blue-purple) and
eosin (cytoplasm, fibres, pink); a Beer-Lambert mix with per-slide jittered stain vectors turns them
into RGB, so colour varies across slides while morphology (nuclear size, shape, density and
arrangement) identifies the class. All textures are functions of level-0 coordinates (see ``noise``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from wsi_llava.synth.labels import FAT, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR, SlideLabels
from wsi_llava.synth.layout import QUARTER, Layout
from wsi_llava.synth.noise import JitteredCells, Noise, uniform2

_F = np.float32
_LN10 = math.log(10.0)
_H_BASE = np.array([0.59, 0.75, 0.31])  # optical density direction of haematoxylin
_E_BASE = np.array([0.13, 0.86, 0.48])  # and of eosin


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Style:
    """Per-slide stain and morphology parameters (jittered stain; grade-driven morphology)."""

    h_od: tuple[float, float, float]
    e_od: tuple[float, float, float]
    bg_od: tuple[float, float, float]
    noise: float
    blur: float
    salt: int
    stroma_angle: float
    nuc_scale: float  #: tumour nuclear size factor (grows with grade)
    pleo: float  #: nuclear pleomorphism 0..1 (grows with grade)
    gland_irregularity: float
    lumen_prob: float  #: fraction of glands with a lumen (G3: few)
    pearl_prob: float  #: fraction of nest cells holding a keratin pearl


_GRADE = {  # nuc_scale, pleo, gland irregularity, lumen prob, pearl prob
    "G1": (1.0, 0.08, 0.05, 1.0, 0.75),
    "G2": (1.25, 0.28, 0.28, 0.9, 0.45),
    "G3": (1.55, 0.5, 0.35, 0.4, 0.2),
    "not applicable": (1.0, 0.1, 0.1, 1.0, 0.0),
}


def make_style(labels: SlideLabels, rng: np.random.Generator) -> Style:
    """Stain jitter per slide (vectors rotated a little, strengths +-25 %) and grade morphology."""
    h = _unit(_H_BASE + rng.normal(0, 0.05, 3)) * rng.uniform(0.85, 1.2)
    e = _unit(_E_BASE + rng.normal(0, 0.06, 3)) * rng.uniform(0.75, 1.25)
    bg = np.clip(rng.normal(0.025, 0.01, 3), 0.0, 0.06)
    ns, pl, gi, lp, pp = _GRADE[labels.grade]
    return Style(
        h_od=tuple(float(v) for v in h),
        e_od=tuple(float(v) for v in e),
        bg_od=tuple(float(v) for v in bg),
        noise=float(rng.uniform(2.0, 4.0)),
        blur=float(rng.uniform(0.6, 0.9)),
        salt=int(rng.integers(1 << 28)),
        stroma_angle=float(rng.uniform(0, math.pi)),
        nuc_scale=ns,
        pleo=pl,
        gland_irregularity=gi,
        lumen_prob=lp,
        pearl_prob=pp,
    )


def _ellipse(dx, dy, a, b, phi):
    c, s = np.cos(phi), np.sin(phi)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return (u / a) ** 2 + (v / b) ** 2


class Textures:
    """Stain densities ``(H, E)`` for flat arrays of level-0 pixel coordinates, one method per class."""

    def __init__(self, labels: SlideLabels, style: Style, noise: Noise) -> None:
        self.labels = labels
        self.st = style
        self.nz = noise
        s = style.salt
        self.stroma_nuclei = JitteredCells(noise, 70, s + 100, margin=16)
        self.lymph_a = JitteredCells(noise, 18, s + 200, margin=6)
        self.lymph_b = JitteredCells(noise, 23, s + 210, margin=6)
        self.debris = JitteredCells(noise, 15, s + 300, margin=4)
        self.pearls = JitteredCells(noise, 230, s + 500, margin=56)

    # --- stroma ----------------------------------------------------------------------------------
    def stroma(self, x, y, light: bool = False):
        nz, s = self.nz, self.st.salt
        th0 = self.st.stroma_angle
        c0, s0 = _F(math.cos(th0)), _F(math.sin(th0))
        warp = _F(70) * nz.value(x, y, 260, s + 1) + _F(25) * nz.value(x, y, 70, s + 2)
        u = x * c0 + y * s0 + warp
        fib = _F(0.5) + _F(0.5) * np.sin(u * _F(2 * math.pi / 12))
        loose = np.clip((nz.value(x, y, 110, s + 3) - _F(0.2)) * _F(2.5), 0.6, 1.0)
        e = (_F(0.34) + _F(0.40) * fib * fib) * loose
        h = np.full_like(x, 0.03)
        idx, dx, dy = self.stroma_nuclei.own(x, y)
        keep = self.stroma_nuclei.rand(idx, 0) < (0.35 if light else 0.5)
        a = _F(9) + _F(5) * self.stroma_nuclei.rand(idx, 1)
        b = _F(2.3) + _F(1.0) * self.stroma_nuclei.rand(idx, 2)
        nuc = keep & (_ellipse(dx, dy, a, b, th0 + _F(0.3) * (self.stroma_nuclei.rand(idx, 3) - _F(0.5))) < 1)
        h = np.where(nuc, _F(1.0), h)
        e = np.where(nuc, e * _F(0.5), e)
        if light:
            e = e * _F(0.75)
        return h, e

    # --- lymphocytes -----------------------------------------------------------------------------
    def lymphocytes(self, x, y):
        h = np.full_like(x, 0.10)
        e = _F(0.16) + _F(0.08) * self.nz.value(x, y, 20, self.st.salt + 11)
        for cells, keep_p in ((self.lymph_a, 0.95), (self.lymph_b, 0.7)):
            idx, dx, dy = cells.own(x, y)
            r = _F(4.6) + _F(1.6) * cells.rand(idx, 0)
            keep = cells.rand(idx, 1) < keep_p
            inside = keep & (dx * dx + dy * dy < r * r)
            h = np.where(inside, _F(1.25) + _F(0.3) * cells.rand(idx, 2), h)
        return h, e

    # --- necrosis --------------------------------------------------------------------------------
    def necrosis(self, x, y):
        nz, s = self.nz, self.st.salt
        e = _F(0.20) + _F(0.22) * nz.fbm(x, y, 70, s + 21, 2)
        h = _F(0.04) + _F(0.10) * nz.value(x, y, 35, s + 22)
        idx, dx, dy = self.debris.own(x, y)
        keep = self.debris.rand(idx, 0) < _F(0.55) * nz.value(x, y, 120, s + 23) + _F(0.05)
        r = _F(1.0) + _F(2.2) * self.debris.rand(idx, 1)
        frag = keep & (_ellipse(dx, dy, r * 1.4, r * 0.8, self.debris.rand(idx, 2) * _F(math.pi)) < 1)
        h = np.where(frag, _F(1.05), h)
        return h, e

    # --- fat -------------------------------------------------------------------------------------
    def fat(self, x, y):
        d1, d2, _, _, _ = self.nz.worley(x, y, 88, self.st.salt + 31, jitter=0.85)
        membrane = (d2 - d1) < _F(3.2)
        e = np.where(membrane, _F(0.55), _F(0.015))
        h = np.where(membrane, _F(0.05), _F(0.0))
        return h, e

    # --- tumour ----------------------------------------------------------------------------------
    def _solid(self, x, y, eosin: float, borders: bool):
        """Sheets of large polygonal cells with one nucleus each; size and pleomorphism follow grade."""
        st, nz = self.st, self.nz
        cell = 30 + 4 * st.nuc_scale
        d1, d2, nb, sx, sy = nz.worley(x, y, cell, st.salt + 41, jitter=0.8)
        e = np.full_like(x, eosin) + _F(0.08) * nz.value(x, y, 25, st.salt + 42)
        if borders:
            e = np.where((d2 - d1) < _F(2.2), e + _F(0.25), e)
        u0, u1, u2, u3 = (nz.seed_uniform(nb, cell, st.salt + 43 + k) for k in range(4))
        r = _F(6.2 * st.nuc_scale) * (_F(1) + _F(st.pleo) * (u0 - _F(0.5)) * _F(2))
        ecc = _F(1) + _F(0.9 * st.pleo) * u1
        nuc = _ellipse(x - sx, y - sy, r * ecc, r / ecc, u2 * _F(math.pi)) < 1
        h = np.where(nuc, _F(0.85) + _F(0.6 * st.pleo + 0.1) * u3, _F(0.06))
        return h, e

    def sheets(self, x, y):
        st = self.st
        h, e = self._solid(x, y, 0.58, borders=True)
        # nests separated by thin fibrous septa
        d1, d2, _, _, _ = self.nz.worley(x, y, 300, st.salt + 51, jitter=0.8)
        septa = (d2 - d1) < _F(16)
        if septa.any():
            hs, es = self.stroma(x[septa], y[septa], light=True)
            h[septa], e[septa] = hs, es
        # keratin pearls: concentric eosinophilic whorls without nuclei
        idx, dx, dy = self.pearls.own(x, y)
        keep = self.pearls.rand(idx, 0) < st.pearl_prob
        big_r = _F(30) + _F(22) * self.pearls.rand(idx, 1)
        d = np.sqrt(dx * dx + dy * dy)
        pearl = keep & (d < big_r) & ~septa
        lam = _F(0.5) + _F(0.5) * np.sin(d * _F(2 * math.pi / 7))
        h = np.where(pearl, _F(0.04) + _F(0.25) * (d > big_r - 5), h)
        e = np.where(pearl, _F(0.95) + _F(0.35) * lam, e)
        return h, e

    def glands(self, x, y):
        st, nz = self.st, self.nz
        cell = 150.0
        jitter = 0.45 + st.gland_irregularity
        d1, d2, nb, sx, sy = nz.worley(x, y, cell, st.salt + 400, jitter=jitter)
        dx, dy = x - sx, y - sy
        rho = d1
        phi = np.arctan2(dy, dx)
        k1, k2, ph1, ph2, r_u, lum_u = (nz.seed_uniform(nb, cell, st.salt + 402 + k) for k in range(6))
        irr = _F(st.gland_irregularity)
        r_out = (_F(42) + _F(12) * r_u) * (
            _F(1)
            + irr * _F(0.6) * np.sin(phi * np.floor(_F(2) + _F(3) * k1) + ph1 * _F(6.3))
            + irr * _F(0.4) * np.sin(phi * np.floor(_F(4) + _F(3) * k2) + ph2 * _F(6.3))
        )
        thick = _F(17 * st.nuc_scale**0.5)
        r_in = np.maximum(r_out - thick, _F(6))
        has_lumen = lum_u < st.lumen_prob
        if st.lumen_prob < 1:  # G3: solid sheets everywhere except the few glands that keep a lumen
            h, e = self._solid(x, y, 0.40, borders=False)
        else:  # intervening fibrous stroma between glands
            h, e = self.stroma(x, y, light=True)
        gland = has_lumen & (rho < r_out) & ((d2 - d1) > _F(10))
        lumen = gland & (rho < r_in)
        ring = gland & ~lumen
        # cuboidal cells around the lumen, one nucleus per cell, near the basal side
        n_cells = np.maximum(np.floor(_F(2 * math.pi) * (r_in + thick * _F(0.6)) / _F(11)), _F(6))
        t = (phi + _F(math.pi)) / _F(2 * math.pi) * n_cells
        k = np.floor(t)
        jit = uniform2(nb, k.astype(np.int64), st.salt + 461)
        size = _F(1) + _F(st.pleo) * (jit - _F(0.5)) * _F(2)
        rho_n = r_in + thick * (_F(0.62) + _F(0.25 * st.pleo) * (jit - _F(0.5)))
        a = (rho - rho_n) / (_F(5.0 * st.nuc_scale) * size)
        b = (t - k - _F(0.5)) * _F(2 * math.pi) * rho_n / n_cells / (_F(3.4 * st.nuc_scale) * size)
        nuc = ring & (a * a + b * b < 1)
        h = np.where(ring, np.where(nuc, _F(0.95) + _F(0.4 * st.pleo) * jit, _F(0.08)), h)
        e = np.where(ring, _F(0.42), e)
        e = np.where(lumen, _F(0.03) + _F(0.06) * nz.value(x, y, 15, st.salt + 462), e)
        h = np.where(lumen, _F(0.0), h)
        return h, e

    def tumour(self, x, y):
        return self.glands(x, y) if self.labels.pattern == "glands" else self.sheets(x, y)

    def for_class(self, c: int):
        return {
            TUMOUR: self.tumour,
            STROMA: self.stroma,
            NECROSIS: self.necrosis,
            LYMPHOCYTES: self.lymphocytes,
            FAT: self.fat,
        }[c]


class SlideRenderer:
    """Renders rows ``[y0, y1)`` of level 0 as RGB uint8, using only the layout's label map."""

    MARGIN = 4

    def __init__(self, labels: SlideLabels, layout: Layout, style: Style, noise_seed: int) -> None:
        self.labels = labels
        self.layout = layout
        self.style = style
        self.tex = Textures(labels, style, Noise(layout.width, layout.height))
        self.noise_seed = int(noise_seed)

    def strip(self, y0: int, y1: int) -> np.ndarray:
        w = self.layout.width
        m = self.MARGIN
        ys = np.arange(y0 - m, y1 + m)
        qy = np.clip(ys // QUARTER, 0, self.layout.label_q.shape[0] - 1)
        lab = np.repeat(self.layout.label_q[qy], QUARTER, axis=1)[:, :w]
        rows = len(ys)
        hmap = np.zeros((rows, w), np.float32)
        emap = np.zeros((rows, w), np.float32)
        flat_l = lab.ravel()
        for c in np.unique(flat_l):
            if c == 0:
                continue
            idx = np.flatnonzero(flat_l == c)
            x = (idx % w).astype(np.float32)
            y = (idx // w + (y0 - m)).astype(np.float32)
            h, e = self.tex.for_class(int(c))(x, y)
            hmap.ravel()[idx] = h
            emap.ravel()[idx] = e
        if self.style.blur > 0:
            hmap = gaussian_filter(hmap, self.style.blur)
            emap = gaussian_filter(emap, self.style.blur)
        hmap, emap = hmap[m:-m], emap[m:-m]
        st = self.style
        rgb = np.empty((y1 - y0, w, 3), np.uint8)
        rng = np.random.default_rng([self.noise_seed, y0])
        for ch in range(3):
            od = hmap * _F(st.h_od[ch]) + emap * _F(st.e_od[ch]) + _F(st.bg_od[ch])
            val = _F(255) * np.exp(-od * _F(_LN10))
            val += rng.standard_normal(val.shape, dtype=np.float32) * _F(st.noise)
            rgb[..., ch] = np.clip(val, 0, 255).astype(np.uint8)
        return rgb
