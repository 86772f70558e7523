"""``Region``: a polygon (or rectangle) in level-0 pixels with the annotation it came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from wsi_llava.errors import RegionError

Shape = Literal["rectangle", "polygon"]


def shape_kind(points: Sequence[Sequence[float]], holes: Sequence[Any] = ()) -> Shape:
    """``"rectangle"`` for an axis-aligned rectangle without holes walked around its edge, else ``"polygon"``.

    The four corners must follow each other along axis-aligned edges: the same corners visited
    crosswise (a bow-tie) are a self-intersecting polygon, not a rectangle.
    """
    pts = [(float(p[0]), float(p[1])) for p in points]
    if len(pts) >= 2 and pts[0] == pts[-1]:
        pts = pts[:-1]
    if holes or len(pts) != 4:
        return "polygon"
    if len({x for x, _ in pts}) != 2 or len({y for _, y in pts}) != 2 or len(set(pts)) != 4:
        return "polygon"
    edges = zip(pts, pts[1:] + pts[:1], strict=True)
    if all((a[0] == b[0]) != (a[1] == b[1]) for a, b in edges):
        return "rectangle"
    return "polygon"


#: level-0 coordinates are int32 in tile grids and caches: a region beyond that lies on no slide
MAX_COORD = float(2**31 - 1)


class Region(BaseModel):
    """A polygon in level-0 ``(x, y)`` pixels; ``properties`` keeps the source annotation untouched."""

    model_config = ConfigDict(extra="forbid")

    points: list[tuple[float, float]] = Field(description="polygon vertices, level-0 px, (x, y)")
    kind: Shape = "polygon"
    id: str | None = None
    name: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    holes: list[list[tuple[float, float]]] = Field(default_factory=list)

    @field_validator("points")
    @classmethod
    def _enough_points(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if len(v) >= 2 and tuple(v[0]) == tuple(v[-1]):
            v = v[:-1]
        if len(v) < 3:
            raise ValueError("a region needs at least 3 distinct vertices")
        arr = np.asarray(v, dtype=float)
        if not np.isfinite(arr).all():
            raise ValueError("region vertices must be finite numbers")
        return [(float(x), float(y)) for x, y in v]

    @classmethod
    def rectangle(
        cls, x: float, y: float, w: float, h: float, *, source: str | None = None, **kw: Any
    ) -> Region:
        """The rectangle with top-left ``(x, y)`` and size ``w`` x ``h`` in level-0 px (finite, below 2^31)."""
        what = source or f"region {x},{y},{w},{h}"
        values = np.asarray([x, y, w, h, x + w, y + h], dtype=float)
        if not np.isfinite(values).all() or (np.abs(values) > MAX_COORD).any():
            raise RegionError(
                f"{what}: x, y, width and height must be finite level-0 pixel numbers (|value| < 2^31)"
            )
        if w <= 0 or h <= 0:
            raise RegionError(f"{what}: width and height must be positive")
        return cls(points=[(x, y), (x + w, y), (x + w, y + h), (x, y + h)], kind="rectangle", **kw)

    @classmethod
    def parse_rect(cls, text: str) -> Region:
        """Parse ``"x,y,w,h"`` (level-0 px), as the CLI's ``--region`` takes it."""
        parts = text.replace(" ", "").split(",")
        try:
            x, y, w, h = (float(p) for p in parts)
        except ValueError:
            raise RegionError(f"--region {text!r}: expected four numbers x,y,w,h in level-0 pixels") from None
        return cls.rectangle(x, y, w, h, source=f"--region {text!r}")

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)``."""
        a = np.asarray(self.points)
        return float(a[:, 0].min()), float(a[:, 1].min()), float(a[:, 0].max()), float(a[:, 1].max())

    @property
    def area(self) -> float:
        a = np.asarray(self.points)
        x, y = a[:, 0], a[:, 1]
        outer = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        inner = 0.0
        for hole in self.holes:
            b = np.asarray(hole)
            inner += 0.5 * abs(np.dot(b[:, 0], np.roll(b[:, 1], -1)) - np.dot(b[:, 1], np.roll(b[:, 0], -1)))
        return float(outer - inner)

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Boolean mask: which level-0 points lie inside the polygon (and outside its holes)."""
        from skimage.measure import points_in_poly

        pts = np.stack([np.asarray(xs, float), np.asarray(ys, float)], axis=1)
        inside = points_in_poly(pts, np.asarray(self.points))
        for hole in self.holes:
            inside &= ~points_in_poly(pts, np.asarray(hole))
        return inside

    def check_within(self, width: int, height: int, source: str = "region") -> None:
        """Raise ``RegionError`` if the region does not overlap a ``width`` x ``height`` slide."""
        xmin, ymin, xmax, ymax = self.bounds
        if xmax <= 0 or ymax <= 0 or xmin >= width or ymin >= height:
            raise RegionError(
                f"{source}: region bounds ({xmin:.0f}, {ymin:.0f})-({xmax:.0f}, {ymax:.0f}) lie outside "
                f"the slide (0, 0)-({width}, {height})"
            )
        if self.area <= 0:
            raise RegionError(f"{source}: region has zero area")
