"""QuPath GeoJSON annotations: read them into ``Region`` objects, write them back without loss, pick one.

QuPath exports a ``FeatureCollection``, a single ``Feature`` or a bare JSON list of features; all
three are read. Geometry is ``Polygon`` or ``MultiPolygon`` in level-0 pixels. QuPath's writer (Gson)
emits non-finite measurements as bare ``NaN``/``Infinity`` tokens; they are read and written the same way.

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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from wsi_llava.atomic import atomic_write_text
from wsi_llava.errors import AnnotationError
from wsi_llava.slide.region import Region, shape_kind

logger = logging.getLogger(__name__)

#: key in ``Region.properties`` holding what a Region cannot represent itself (see module docstring)
PRIVATE_KEY = "_geojson"
#: deepest nesting accepted outside polygon coordinates; QuPath writes a handful of levels, and deeper
#: values would overflow the copies and writes that follow
MAX_DEPTH = 100
#: most annotations a selection message lists
LIST_MAX = 20

_POLYGON_TYPES = ("Polygon", "MultiPolygon")
_FEATURE_MEMBERS = ("type", "id", "geometry", "properties")


def printable(text: object) -> str:
    """``text`` for a terminal: control and other unprintable characters shown as escapes (``\\x1b``)."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


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


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _shown(value: Any) -> str:
    """A short, printable rendering of a JSON value for an error message."""
    members = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if any(isinstance(v, dict | list) for v in members):
        return f"(a nested {'object' if isinstance(value, dict) else 'list'})"
    text = repr(value)
    return printable(text if len(text) <= 80 else text[:77] + "...")


def _parse_ring(ring: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(ring, list) or not ring:
        raise AnnotationError(f"{where}: a polygon ring must be a non-empty list of [x, y] positions")
    out: list[tuple[float, float]] = []
    for pos in ring:
        if not isinstance(pos, list) or len(pos) < 2 or not all(_is_number(v) for v in pos):
            raise AnnotationError(f"{where}: position {_shown(pos)} is not a pair of numbers [x, y]")
        out.append((float(pos[0]), float(pos[1])))
    return out


def _parse_polygon(
    coords: Any, where: str
) -> tuple[list[tuple[float, float]], list[list[tuple[float, float]]]]:
    if not isinstance(coords, list) or not coords:
        raise AnnotationError(f"{where}: polygon 'coordinates' must be a non-empty list of rings")
    rings = [_open_ring(_parse_ring(r, where)) for r in coords]
    return rings[0], rings[1:]


def _feature_to_region(feature: Any, where: str) -> Region:
    if not isinstance(feature, dict):
        raise AnnotationError(f"{where}: expected a GeoJSON Feature object, got {type(feature).__name__}")
    if feature.get("type") not in (None, "Feature"):
        raise AnnotationError(f"{where}: expected type 'Feature', got {_shown(feature.get('type'))}")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise AnnotationError(f"{where}: has no geometry (expected a Polygon or MultiPolygon)")
    gtype = geometry.get("type")
    if gtype not in _POLYGON_TYPES:
        raise AnnotationError(
            f"{where}: geometry type {_shown(gtype)} is not supported (expected Polygon or MultiPolygon)"
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
            kind=shape_kind(points, holes),
            id=None if fid is None else str(fid),
            name=None if name is None else str(name),
            properties=props,
        )
    except ValidationError as e:
        msgs = "; ".join(err["msg"] for err in e.errors())
        raise AnnotationError(f"{where}: invalid polygon: {msgs}") from None


def geometry_to_region(geometry: Any, where: str = "geometry") -> Region:
    """A bare GeoJSON Polygon or MultiPolygon geometry as a Region, parsed as a feature's geometry is."""
    _check_depth(geometry, where)
    return _feature_to_region({"type": "Feature", "geometry": geometry}, where)


# --- files -------------------------------------------------------------------------------------------
@dataclass
class GeoJSONFile:
    """A parsed GeoJSON file: its top-level value as read and its list of features."""

    path: Path
    data: Any
    features: list[Any]

    def collection(self, features: list[Any]) -> dict[str, Any]:
        """A FeatureCollection of ``features`` keeping this file's other top-level members, in their order."""
        if not (isinstance(self.data, dict) and self.data.get("type") == "FeatureCollection"):
            return {"type": "FeatureCollection", "features": features}
        return {k: (features if k == "features" else v) for k, v in self.data.items()}


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` levels deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _check_depth(value: Any, where: str) -> None:
    if isinstance(value, dict | list) and _too_deep(value, MAX_DEPTH):
        raise AnnotationError(f"{where}: nested more than {MAX_DEPTH} levels deep; not a QuPath export")


def _check_feature_depth(feature: Any, where: str) -> None:
    """Depth of everything but polygon coordinates, which parsing checks position by position."""
    if not isinstance(feature, dict):
        _check_depth(feature, where)
        return
    geometry = feature.get("geometry")
    for key, value in feature.items():
        if key == "geometry" and isinstance(geometry, dict) and geometry.get("type") in _POLYGON_TYPES:
            _check_depth({k: v for k, v in geometry.items() if k != "coordinates"}, where)
        else:
            _check_depth(value, where)


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
    got = type(data).__name__
    if isinstance(data, dict):
        got += f" of type {_shown(data.get('type'))}"
    raise AnnotationError(
        f"{path}: expected a GeoJSON FeatureCollection, a Feature or a list of Features (got {got})"
    )


def load_geojson(path: str | Path) -> GeoJSONFile:
    """Parse a GeoJSON file as QuPath writes it (bare ``NaN``/``Infinity`` numbers included).

    Raises ``AnnotationError`` naming the file when it cannot be read, is not JSON, nests too
    deeply or is not a FeatureCollection, a Feature or a list of Features.
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
    except RecursionError:
        raise AnnotationError(f"{path}: nested too deeply to read; not a QuPath export") from None
    return parse_geojson(data, path)


def parse_geojson(data: Any, path: str | Path) -> GeoJSONFile:
    """Already-parsed GeoJSON (a request body, say) checked as :func:`load_geojson` checks a file;
    ``path`` names it in messages."""
    path = Path(path)
    features = _features_of(data, path)
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        _check_depth({k: v for k, v in data.items() if k != "features"}, str(path))
    for i, feature in enumerate(features):
        _check_feature_depth(feature, f"{path}: feature {i}")
    return GeoJSONFile(path=path, data=data, features=features)


def _feature_where(path: Path, i: int, feature: Any) -> str:
    where = f"{path}: feature {i}"
    if isinstance(feature, dict):
        props = feature.get("properties")
        label = feature.get("id") or (props.get("name") if isinstance(props, dict) else None)
        if label:
            where += f" ({printable(label)})"
    return where


def geometry_kind(feature: Any) -> str:
    """How summaries name a feature's geometry: its GeoJSON type, or ``"no geometry"``."""
    geometry = feature.get("geometry") if isinstance(feature, dict) else None
    gtype = geometry.get("type") if isinstance(geometry, dict) else None
    return printable(gtype) if isinstance(gtype, str) else "no geometry"


def polygon_regions(
    gj: GeoJSONFile, skip_unsupported: bool = False
) -> tuple[list[tuple[int, Region]], Counter[str]]:
    """``(feature index, Region)`` for each polygon feature, and the skipped features counted by geometry.

    Without ``skip_unsupported`` a feature that is not a polygon raises ``AnnotationError``.
    """
    out: list[tuple[int, Region]] = []
    skipped: Counter[str] = Counter()
    for i, feature in enumerate(gj.features):
        if skip_unsupported and isinstance(feature, dict):
            kind = geometry_kind(feature)
            if kind not in _POLYGON_TYPES:
                skipped[kind] += 1
                continue
        out.append((i, _feature_to_region(feature, _feature_where(gj.path, i, feature))))
    return out, skipped


def summarise(counts: Counter[str]) -> str:
    """``"77000 detection, 5 Point"``: counts per kind, most frequent first."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def skipped_note(skipped: Counter[str]) -> str:
    """Which features were skipped as not polygons, counted per geometry type, in one line."""
    n = sum(skipped.values())
    return f"skipped {n} feature{'s' * (n != 1)} that are not polygons ({summarise(skipped)})"


def read_geojson(path: str | Path, skip_unsupported: bool = False) -> list[Region]:
    """Read QuPath GeoJSON annotations as Regions (level-0 px), keeping every property.

    With ``skip_unsupported`` features whose geometry is not a polygon (points, lines, none) are
    skipped with one summarising warning instead of raising ``AnnotationError``.
    """
    gj = load_geojson(path)
    entries, skipped = polygon_regions(gj, skip_unsupported)
    if skipped:
        logger.warning("%s: %s", gj.path, skipped_note(skipped))
    return [r for _, r in entries]


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


def dump_geojson(path: str | Path, document: dict[str, Any]) -> None:
    """Write a GeoJSON ``document`` atomically, as QuPath writes it: UTF-8, ``NaN``/``Infinity`` as bare tokens.

    A symlinked ``path`` is written through to its target; an existing file keeps its permissions.
    """
    try:
        text = json.dumps(document, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise AnnotationError(f"{path}: cannot write GeoJSON: {e}") from None
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise AnnotationError(f"{path}: cannot write GeoJSON: {e}") from None


def write_geojson(path: str | Path, regions: Iterable[Region]) -> None:
    """Write ``regions`` as a QuPath GeoJSON FeatureCollection, atomically (temp file + rename)."""
    dump_geojson(path, {"type": "FeatureCollection", "features": [region_to_feature(r) for r in regions]})


# --- choosing one annotation ---------------------------------------------------------------------------
def _entry(position: int, region: Region) -> str:
    parts = [f"id {_shown(region.id)}" if region.id is not None else "no id"]
    parts.append(f"name {_shown(region.name)}" if region.name is not None else "no name")
    return f"--index {position}: {', '.join(parts)}"


def listing(entries: Sequence[tuple[int, Region]], limit: int = LIST_MAX) -> str:
    """One line per annotation saying how to choose it, at most ``limit`` lines and a count of the rest."""
    lines = [f"  {_entry(i, r)}" for i, r in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"  ... and {len(entries) - limit} more")
    return "\n".join(lines)


def find_region(
    regions: Sequence[Region], key: str, source: str, positions: Sequence[int] | None = None
) -> Region:
    """The one region whose id, or else whose name, equals ``key``; ``source`` names the file in errors.

    ``positions`` are the regions' feature indices in the file (default: their order). An id or name
    shared by several regions is refused, listing them: answering about an arbitrary one would be wrong.
    """
    entries = list(zip(positions if positions is not None else range(len(regions)), regions, strict=True))
    for field in ("id", "name"):
        matches = [(i, r) for i, r in entries if getattr(r, field) is not None and getattr(r, field) == key]
        if len(matches) == 1:
            return matches[0][1]
        if matches:
            raise AnnotationError(
                f"{source}: {len(matches)} annotations have the {field} {_shown(key)}; choose one with --index:\n"
                + listing(matches)
            )
    if not entries:
        raise AnnotationError(
            f"{source}: no annotation with id or name {_shown(key)}; the file holds no polygon annotations"
        )
    raise AnnotationError(
        f"{source}: no annotation with id or name {_shown(key)}; choose one with --id or --index:\n"
        + listing(entries)
    )


def select_region(path: str | Path, key: str | None = None, index: int | None = None) -> Region:
    """The annotation of a GeoJSON file to ask about: by id or name (``key``), by feature ``index``, or the only one.

    Features that are not polygons are skipped with one summarising warning. Raises
    ``AnnotationError`` saying what the file holds and how to choose when the choice is not clear.
    """
    if key is not None and index is not None:
        raise AnnotationError("choose the annotation with --id or with --index, not both")
    gj = load_geojson(path)
    entries, skipped = polygon_regions(gj, skip_unsupported=True)
    if not entries:
        note = f"; {skipped_note(skipped)}" if skipped else ""
        raise AnnotationError(f"{gj.path}: holds no polygon annotations to ask about{note}")
    if skipped:
        logger.warning("%s: %s", gj.path, skipped_note(skipped))
    if index is not None:
        for i, region in entries:
            if i == index:
                return region
        raise AnnotationError(
            f"{gj.path}: no polygon annotation at --index {index}; choose one of:\n" + listing(entries)
        )
    if key is not None:
        return find_region([r for _, r in entries], key, str(gj.path), positions=[i for i, _ in entries])
    if len(entries) == 1:
        return entries[0][1]
    raise AnnotationError(
        f"{gj.path}: holds {len(entries)} annotations; choose one with --id (its id or name) or --index:\n"
        + listing(entries)
    )
