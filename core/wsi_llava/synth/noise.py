"""Coordinate-hashed noise: the same pixel gets the same value whichever strip renders it.

Every random texture of a slide is a pure function of level-0 ``(x, y)`` and a salt, so slides can be
rendered strip by strip (bounded memory) and stay deterministic for a seed.
"""

from __future__ import annotations

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)


def hash2(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """A well-mixed uint32 hash of integer cell coordinates and a salt."""
    a = np.asarray(ix, dtype=np.int64).astype(np.uint64) & _M32
    b = np.asarray(iy, dtype=np.int64).astype(np.uint64) & _M32
    h = (
        a * np.uint64(0x8DA6B343) + b * np.uint64(0xD8163841) + np.uint64((salt * 0x9E3779B1) & 0xFFFFFFFF)
    ) & _M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x7FEB352D)) & _M32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x846CA68B)) & _M32
    h ^= h >> np.uint64(16)
    return h.astype(np.uint32)


def _uniform_table(salt: int, nx: int, ny: int) -> np.ndarray:
    """Per-cell uniform values for cells ``-PAD .. n+PAD`` in both axes, flattened row-major."""
    iy, ix = np.mgrid[-PAD : ny + PAD, -PAD : nx + PAD]
    return ((hash2(ix, iy, salt) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))).ravel()


PAD = 3


class Noise:
    """Hashed noise over one slide of ``width`` x ``height`` level-0 px (lookup tables per cell size).

    Per-cell random values are hashed once into a table, then gathered per pixel: much cheaper than
    hashing every pixel, and identical whichever strip asks.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width = int(width)
        self.height = int(height)
        self._tables: dict[tuple[int, float] | tuple[int, float, float], tuple[np.ndarray, int]] = {}

    def _table(self, salt: int, cell: float) -> tuple[np.ndarray, int]:
        key = (int(salt), float(cell))
        if key not in self._tables:
            nx = int(self.width // cell) + 2
            ny = int(self.height // cell) + 2
            self._tables[key] = (_uniform_table(int(salt), nx, ny), nx + 2 * PAD)
        return self._tables[key]

    def cell_uniform(self, ix: np.ndarray, iy: np.ndarray, cell: float, salt: int) -> np.ndarray:
        """Uniform float32 in [0, 1) for integer cells of a grid of ``cell`` px."""
        table, stride = self._table(salt, cell)
        return table[(iy + PAD) * stride + (ix + PAD)]

    def value(self, x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
        """Smooth noise in [0, 1) with features of about ``scale`` px (bilinear + smoothstep)."""
        table, stride = self._table(salt, scale)
        fx = x * np.float32(1.0 / scale)
        fy = y * np.float32(1.0 / scale)
        ix = np.floor(fx)
        iy = np.floor(fy)
        tx = fx - ix
        ty = fy - iy
        tx = tx * tx * (3 - 2 * tx)
        ty = ty * ty * (3 - 2 * ty)
        base = (iy.astype(np.int32) + PAD) * stride + (ix.astype(np.int32) + PAD)
        v00 = table[base]
        v10 = table[base + 1]
        v01 = table[base + stride]
        v11 = table[base + stride + 1]
        top = v00 + (v10 - v00) * tx
        bot = v01 + (v11 - v01) * tx
        return top + (bot - top) * ty

    def fbm(self, x: np.ndarray, y: np.ndarray, scale: float, salt: int, octaves: int = 3) -> np.ndarray:
        """Fractal value noise in about [0, 1): octaves of halving scale and amplitude."""
        total = np.zeros(np.shape(x), np.float32)
        amp, norm = 1.0, 0.0
        for o in range(octaves):
            total += np.float32(amp) * self.value(x, y, scale / (2**o), salt + 7919 * o)
            norm += amp
            amp *= 0.5
        return total / np.float32(norm)

    def _seeds(self, salt: int, cell: float, jitter: float) -> tuple[np.ndarray, np.ndarray, int]:
        """Seed positions (in cell units) of every cell, flattened like the tables."""
        key = (int(salt), float(cell), -float(jitter))
        if key not in self._tables:
            tx, stride = self._table(salt, cell)
            ty, _ = self._table(salt + 1, cell)
            n = len(tx)
            ix = (np.arange(n) % stride - PAD).astype(np.float32)
            iy = (np.arange(n) // stride - PAD).astype(np.float32)
            lo = np.float32((1.0 - jitter) / 2)
            sx = ix + lo + np.float32(jitter) * tx
            sy = iy + lo + np.float32(jitter) * ty
            self._tables[key] = (np.stack([sx, sy]), stride)
        both, stride = self._tables[key]
        return both[0], both[1], stride

    def worley(self, x: np.ndarray, y: np.ndarray, cell: float, salt: int, jitter: float = 0.9) -> tuple:
        """Cellular noise: distances to the nearest and second-nearest seed, its index and position (px).

        Seeds are one per ``cell``-sized square, jittered by ``jitter`` of the cell; 3x3 neighbours.
        """
        sxt, syt, stride = self._seeds(salt, cell, jitter)
        fx = x * np.float32(1.0 / cell)
        fy = y * np.float32(1.0 / cell)
        base = (np.floor(fy).astype(np.int32) + PAD) * stride + (np.floor(fx).astype(np.int32) + PAD)
        d1 = np.full(fx.shape, np.inf, np.float32)
        d2 = np.full(fx.shape, np.inf, np.float32)
        nb = base.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                idx = base + np.int32(dy * stride + dx)
                ddx = fx - sxt[idx]
                ddy = fy - syt[idx]
                d = ddx * ddx + ddy * ddy
                closer = d < d1
                np.minimum(d2, np.maximum(d1, d), out=d2)
                np.minimum(d1, d, out=d1)
                np.copyto(nb, idx, where=closer)
        c = np.float32(cell)
        return np.sqrt(d1) * c, np.sqrt(d2) * c, nb, sxt[nb] * c, syt[nb] * c

    def seed_uniform(self, nb: np.ndarray, cell: float, salt: int) -> np.ndarray:
        """Per-seed uniform values for ``nb`` as returned by :meth:`worley` (same ``cell``)."""
        table, _ = self._table(salt, cell)
        return table[nb]


class JitteredCells:
    """One object per square cell of a jittered grid; per-cell random values come from the table.

    ``own(x, y)`` gives, for each pixel, its cell index and the offset from that cell's object centre;
    an object whose radius is at most ``margin`` px stays inside its cell, so one cell is enough.
    """

    def __init__(self, noise: Noise, cell: float, salt: int, margin: float = 0.0) -> None:
        self.noise = noise
        self.cell = float(cell)
        self.salt = int(salt)
        self.margin = float(margin)

    def own(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tx, stride = self.noise._table(self.salt, self.cell)
        ty, _ = self.noise._table(self.salt + 1, self.cell)
        ix = np.floor(x * np.float32(1.0 / self.cell)).astype(np.int32)
        iy = np.floor(y * np.float32(1.0 / self.cell)).astype(np.int32)
        idx = (iy + PAD) * stride + (ix + PAD)
        room = np.float32(max(self.cell - 2 * self.margin, 0.0))
        c = np.float32(self.cell)
        m = np.float32(self.margin)
        cx = ix.astype(np.float32) * c + m + room * tx[idx]
        cy = iy.astype(np.float32) * c + m + room * ty[idx]
        return idx, x - cx, y - cy

    def rand(self, idx: np.ndarray, k: int) -> np.ndarray:
        """The ``k``-th per-cell uniform random value of the cells ``idx`` returned by :meth:`own`."""
        table, _ = self.noise._table(self.salt + 2 + k, self.cell)
        return table[idx]


def uniform2(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Uniform float32 in [0, 1) hashed from any integer pair (slower than the tables; for rare use)."""
    return (hash2(ix, iy, salt) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))
