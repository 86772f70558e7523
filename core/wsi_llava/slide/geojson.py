"""QuPath GeoJSON annotations: read them into ``Region`` objects and write them back without loss.

QuPath exports a ``FeatureCollection``, a single ``Feature`` or a bare JSON list of features; all
three are read. Geometry is ``Polygon`` or ``MultiPolygon`` in level-0 pixels.

Lossless round trip: ``Region.properties`` is the feature's ``properties`` dict, untouched. What a
``Region`` cannot hold itself goes under one private key, :data:`PRIVATE_KEY` (``"_geojson"``), that
is only present when needed and never written into a file's properties:

* a ``MultiPolygon`` becomes one Region whose ``points``/``holes`` are its largest part (by area);
  the full original coordinates and the index of that part are kept, so writing back restores the
  ``MultiPolygon`` with the (possibly edited) largest part put back in its place;
* feature members other than ``type``/``id``/``geometry``/``properties`` (e.g. QuPath's
  ``nucleusGeometry`` of cells) are kept and written back as they were.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from wsi_llava.errors import AnnotationError
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

#: key in ``Region.properties`` holding what a Region cannot represent itself (see module docstring)
PRIVATE_KEY = "_geojson"

_POLYGON_TYPES = ("Polygon", "MultiPolygon")
_FEATURE_MEMBERS = ("type", "id", "geometry", "properties")


def _ring_area(ring: Sequence[Sequence[float]]) -> float:
    a = np.asarray(ring, dtype=float)
    x, y = a[:, 0], a[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _open_ring(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop the closing vertex GeoJSON repeats at the end of each ring."""
    if len(ring) >= 2 and ring[0] == ring[-1]:
        return ring[:-1]
    return ring


def _num(v: float) -> float | int:
    """Integral coordinates are written as JSON integers, as QuPath does."""
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else float(v)


def _closed_ring(points: Iterable[Sequence[float]]) -> list[list[float | int]]:
    ring = [[_num(x), _num(y)] for x, y in points]
    if ring and ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def _parse_ring(ring: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(ring, list) or not ring:
        raise AnnotationError(f"{where}: a polygon ring must be a non-empty list of [x, y] positions")
    out: list[tuple[float, float]] = []
    for pos in ring:
        if (
            not isinstance(pos, list | tuple)
            or len(pos) < 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pos[:2])
        ):
            raise AnnotationError(f"{where}: position {pos!r} is not a pair of numbers [x, y]")
        out.append((float(pos[0]), float(pos[1])))
    return out


def _parse_polygon(
    coords: Any, where: str
) -> tuple[list[tuple[float, float]], list[list[tuple[float, float]]]]:
    if not isinstance(coords, list) or not coords:
        raise AnnotationError(f"{where}: polygon 'coordinates' must be a non-empty list of rings")
    rings = [_open_ring(_parse_ring(r, where)) for r in coords]
    return rings[0], rings[1:]


def _is_rectangle(points: list[tuple[float, float]]) -> bool:
    if len(points) != 4:
        return False
    xs = sorted({p[0] for p in points})
    ys = sorted({p[1] for p in points})
    if len(xs) != 2 or len(ys) != 2:
        return False
    return {(x, y) for x in xs for y in ys} == set(points)


def _feature_to_region(feature: Any, where: str) -> Region:
    if not isinstance(feature, dict):
        raise AnnotationError(f"{where}: expected a GeoJSON Feature object, got {type(feature).__name__}")
    if feature.get("type") not in (None, "Feature"):
        raise AnnotationError(f"{where}: expected type 'Feature', got {feature.get('type')!r}")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise AnnotationError(f"{where}: has no geometry (expected a Polygon or MultiPolygon)")
    gtype = geometry.get("type")
    if gtype not in _POLYGON_TYPES:
        raise AnnotationError(
            f"{where}: geometry type {gtype!r} is not supported (expected Polygon or MultiPolygon)"
        )
    if "coordinates" not in geometry:
        raise AnnotationError(f"{where}: {gtype} geometry has no 'coordinates'")
    coords = geometry["coordinates"]
    props = feature.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise AnnotationError(f"{where}: 'properties' must be an object, got {type(props).__name__}")
    props = dict(props)  # a shallow copy: nested values are shared with the parsed JSON only
    if PRIVATE_KEY in props:
        raise AnnotationError(f"{where}: property {PRIVATE_KEY!r} is reserved by wsi-llava")

    private: dict[str, Any] = {}
    if gtype == "Polygon":
        points, holes = _parse_polygon(coords, where)
    else:
        if not isinstance(coords, list) or not coords:
            raise AnnotationError(f"{where}: MultiPolygon 'coordinates' must be a non-empty list of polygons")
        parts = [_parse_polygon(c, f"{where} (part {k})") for k, c in enumerate(coords)]
        areas = [
            _ring_area(outer) - sum(_ring_area(h) for h in holes) if len(outer) >= 3 else 0.0
            for outer, holes in parts
        ]
        largest = int(np.argmax(areas))
        points, holes = parts[largest]
        private["multipolygon"] = {"coordinates": coords, "part": largest}
    extra = {k: v for k, v in feature.items() if k not in _FEATURE_MEMBERS}
    if extra:
        private["members"] = extra

    fid = feature.get("id")
    if fid is None:
        fid = props.get("id")
    name = props.get("name")
    if private:
        props[PRIVATE_KEY] = private
    try:
        return Region(
            points=points,
            holes=holes,
            kind="rectangle" if _is_rectangle(points) and not holes else "polygon",
            id=None if fid is None else str(fid),
            name=None if name is None else str(name),
            properties=props,
        )
    except ValidationError as e:
        msgs = "; ".join(err["msg"] for err in e.errors())
        raise AnnotationError(f"{where}: invalid polygon: {msgs}") from None


def _features_of(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection":
            feats = data.get("features")
            if not isinstance(feats, list):
                raise AnnotationError(f"{path}: FeatureCollection has no 'features' list")
            return feats
        if data.get("type") == "Feature" or "geometry" in data:
            return [data]
    raise AnnotationError(
        f"{path}: expected a GeoJSON FeatureCollection, a Feature or a list of Features "
        f"(got {type(data).__name__}{' of type ' + repr(data.get('type')) if isinstance(data, dict) else ''})"
    )


def read_geojson(path: str | Path, skip_unsupported: bool = False) -> list[Region]:
    """Read QuPath GeoJSON annotations as Regions (level-0 px), keeping every property.

    With ``skip_unsupported`` features whose geometry is not a polygon (points, lines) are skipped
    with a warning instead of raising ``AnnotationError``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such GeoJSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read GeoJSON: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    regions: list[Region] = []
    for i, feature in enumerate(_features_of(data, path)):
        where = f"{path}: feature {i}"
        if isinstance(feature, dict):
            props = feature.get("properties")
            label = feature.get("id") or (props.get("name") if isinstance(props, dict) else None)
            if label:
                where += f" ({label})"
        if skip_unsupported and isinstance(feature, dict):
            geometry = feature.get("geometry")
            gtype = geometry.get("type") if isinstance(geometry, dict) else None
            if gtype not in _POLYGON_TYPES:
                logger.warning("%s: skipping geometry type %r (not a polygon)", where, gtype)
                continue
        regions.append(_feature_to_region(feature, where))
    return regions


def region_to_feature(region: Region) -> dict[str, Any]:
    """A QuPath-style GeoJSON Feature for ``region`` (``objectType`` defaults to ``annotation``)."""
    props = {k: v for k, v in region.properties.items() if k != PRIVATE_KEY}
    private = region.properties.get(PRIVATE_KEY) or {}
    props.setdefault("objectType", "annotation")
    if region.name is not None:
        props["name"] = region.name
    polygon = [_closed_ring(region.points)] + [_closed_ring(h) for h in region.holes]
    multi = private.get("multipolygon")
    if multi is not None:
        coords = list(multi["coordinates"])
        coords[int(multi["part"])] = polygon
        geometry: dict[str, Any] = {"type": "MultiPolygon", "coordinates": coords}
    else:
        geometry = {"type": "Polygon", "coordinates": polygon}
    feature: dict[str, Any] = {"type": "Feature"}
    if region.id is not None:
        feature["id"] = region.id
    feature["geometry"] = geometry
    feature.update(private.get("members") or {})
    feature["properties"] = props
    return feature


def write_geojson(path: str | Path, regions: Iterable[Region]) -> None:
    """Write ``regions`` as a QuPath GeoJSON FeatureCollection, atomically (temp file + rename)."""
    path = Path(path)
    data = {"type": "FeatureCollection", "features": [region_to_feature(r) for r in regions]}
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise AnnotationError(f"{path}: cannot write GeoJSON: {e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise AnnotationError(f"{path}: cannot write GeoJSON: {e}") from None


def find_region(regions: Sequence[Region], key: str, source: str) -> Region:
    """The region whose id, or else whose name, equals ``key``; ``source`` names the file in errors."""
    by_id = [r for r in regions if r.id is not None and r.id == key]
    if by_id:
        return by_id[0]
    by_name = [r for r in regions if r.name is not None and r.name == key]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        ids = ", ".join(repr(r.id) for r in by_name)
        raise AnnotationError(
            f"{source}: {len(by_name)} annotations are named {key!r}; choose one by id: {ids}"
        )
    listing = [f"{r.id or '-'} ({r.name})" if r.name else f"{r.id or '-'}" for r in regions]
    available = ", ".join(listing) if listing else "none"
    raise AnnotationError(f"{source}: no annotation with id or name {key!r}; available: {available}")
