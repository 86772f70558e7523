"""Shapes layer data <-> core ``Region`` objects, and the feature columns answers are kept in.

Pure data (numpy / pandas), no Qt: the reader, writer, sink and widget all go through here, so the
QuPath GeoJSON round trip (names, descriptions, answers, every other property) has one definition.
A shape's original GeoJSON feature (id, properties, holes) rides along in the ``source`` column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from wsi_llava.annotate import DESCRIPTION_KEY  # QuPath: properties.metadata[DESCRIPTION_KEY]
from wsi_llava.errors import RegionError
from wsi_llava.slide.coords import level0_to_napari, napari_to_level0
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

#: our keys in QuPath's ``metadata`` (string -> string) for the last answer of a shape
QUESTION_KEY = "wsi_llava.question"
ANSWER_KEY = "wsi_llava.answer"
MODEL_KEY = "wsi_llava.model"

#: feature columns of a regions Shapes layer, in order; all strings
COLUMNS = ("name", "description", "question", "answer", "model", "label", "source")
LABEL_CHARS = 40
TEXT = {"string": "{label}", "anchor": "upper_left", "size": 11, "color": "yellow", "translation": [-4, 0]}
META_KEY = "wsi_llava"


def empty_features(n: int = 0) -> pd.DataFrame:
    """A features table with our columns and ``n`` empty rows."""
    return pd.DataFrame({c: [""] * n for c in COLUMNS}, dtype=object)


def normalise_features(features: pd.DataFrame | Mapping[str, Any] | None, n: int) -> pd.DataFrame:
    """``features`` with every one of our columns present (missing values -> ""), other columns kept."""
    df = pd.DataFrame(features) if features is not None else pd.DataFrame(index=range(n))
    if len(df) != n:
        df = df.reindex(range(n))
    df = df.reset_index(drop=True)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
        df[c] = df[c].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        df[c] = df[c].astype(object)
    return df


def short_label(name: str, text: str) -> str:
    """The short on-canvas label of a shape: its name and the start of its answer."""
    text = " ".join(text.split())
    if len(text) > LABEL_CHARS:
        text = text[: LABEL_CHARS - 1].rstrip() + "…"
    if name and text:
        return f"{name}: {text}"
    return name or text


def _ellipse_polygon(vertices_yx: np.ndarray, n: int = 64) -> np.ndarray:
    """napari stores an ellipse as its 4 bounding-box corners; sample it as an ``n``-gon."""
    centre = vertices_yx.mean(axis=0)
    a = np.linalg.norm(vertices_yx[1] - vertices_yx[0]) / 2.0
    b = np.linalg.norm(vertices_yx[3] - vertices_yx[0]) / 2.0
    u = (vertices_yx[1] - vertices_yx[0]) / max(2.0 * a, 1e-12)
    v = (vertices_yx[3] - vertices_yx[0]) / max(2.0 * b, 1e-12)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return centre + np.outer(a * np.cos(t), u) + np.outer(b * np.sin(t), v)


def shape_to_region(
    vertices: np.ndarray,
    shape_type: str,
    row: Mapping[str, Any] | None = None,
    *,
    layer_scale: Sequence[float] = (1.0, 1.0),
    layer_translate: Sequence[float] = (0.0, 0.0),
    image_scale: Sequence[float] = (1.0, 1.0),
    image_translate: Sequence[float] = (0.0, 0.0),
    label: str = "shape",
) -> Region:
    """One napari shape (data coords ``(y, x)``) as a level-0 ``Region`` with its QuPath properties."""
    verts = np.asarray(vertices, dtype=np.float64)[:, -2:]
    if shape_type == "ellipse":
        verts = _ellipse_polygon(verts)
    elif shape_type not in ("rectangle", "polygon"):
        raise RegionError(f"{label}: a {shape_type} has no area; draw a rectangle, polygon or ellipse")
    xy = napari_to_level0(verts, layer_scale, layer_translate, image_scale, image_translate)
    row = dict(row or {})
    source = _load_source(row.get("source", ""), label)
    props: dict[str, Any] = dict(source.get("properties") or {})
    name = str(row.get("name") or "")
    description = str(row.get("description") or "")
    meta = dict(props.get("metadata") or {})
    for key, value in ((DESCRIPTION_KEY, description), (QUESTION_KEY, row.get("question")),
                       (ANSWER_KEY, row.get("answer")), (MODEL_KEY, row.get("model"))):  # fmt: skip
        if value:
            meta[key] = str(value)
        else:
            meta.pop(key, None)
    if meta:
        props["metadata"] = meta
    else:
        props.pop("metadata", None)
    if not name:
        props.pop("name", None)
    holes = source.get("holes") or []
    try:
        return Region(
            points=[(float(x), float(y)) for x, y in xy],
            holes=holes,
            kind="rectangle" if shape_type == "rectangle" else "polygon",
            id=source.get("id"),
            name=name or None,
            properties=props,
        )
    except ValueError as e:
        raise RegionError(f"{label}: not a valid polygon ({e})") from None


def _load_source(text: Any, label: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        source = json.loads(str(text))
    except json.JSONDecodeError:
        logger.warning("%s: unreadable 'source' feature; original GeoJSON properties not restored", label)
        return {}
    return source if isinstance(source, dict) else {}


def region_row(region: Region) -> dict[str, str]:
    """The feature row of a Region read from GeoJSON: name, description, answers, and the source."""
    props = dict(region.properties)
    meta = props.get("metadata") if isinstance(props.get("metadata"), dict) else {}
    name = region.name or ""
    answer = str(meta.get(ANSWER_KEY, ""))
    description = str(meta.get(DESCRIPTION_KEY, ""))
    source = {"id": region.id, "properties": props, "holes": [list(map(list, h)) for h in region.holes]}
    return {
        "name": name,
        "description": description,
        "question": str(meta.get(QUESTION_KEY, "")),
        "answer": answer,
        "model": str(meta.get(MODEL_KEY, "")),
        "label": short_label(name, answer or description),
        "source": json.dumps(source, ensure_ascii=False),
    }


def regions_to_shapes(
    regions: Sequence[Region],
    image_scale: Sequence[float] = (1.0, 1.0),
    image_translate: Sequence[float] = (0.0, 0.0),
) -> tuple[list[np.ndarray], list[str], pd.DataFrame]:
    """Shapes data (level-0 px as data coordinates, ``(y, x)``), shape types and features for ``regions``.

    The layer takes the image's scale/translate so its data coordinates are level-0 pixels.
    """
    data = [
        level0_to_napari(r.points, image_scale, image_translate, image_scale, image_translate)
        for r in regions
    ]
    types = ["rectangle" if r.kind == "rectangle" else "polygon" for r in regions]
    features = normalise_features(pd.DataFrame([region_row(r) for r in regions]), len(regions))
    return data, types, features


def layer_kwargs(
    name: str,
    features: pd.DataFrame,
    image_scale: Sequence[float] = (1.0, 1.0),
    image_translate: Sequence[float] = (0.0, 0.0),
    shape_type: list[str] | None = None,
    extent: float = 2048.0,
    units: Sequence[str] | None = None,
    color: str = "yellow",
) -> dict[str, Any]:
    """Keyword arguments of a regions Shapes layer: answers shown as text, our metadata attached."""
    kw: dict[str, Any] = {
        "name": name,
        "features": features,
        "feature_defaults": {c: "" for c in COLUMNS},
        "text": {**TEXT, "color": color},
        "edge_color": color,
        "face_color": "transparent",
        "edge_width": max(2.0, extent / 400.0),
        "scale": tuple(float(s) for s in image_scale[-2:]),
        "translate": tuple(float(t) for t in image_translate[-2:]),
        "metadata": {META_KEY: image_transform_meta(image_scale, image_translate)},
    }
    if shape_type is not None:
        kw["shape_type"] = shape_type
    if units is not None:
        kw["units"] = tuple(str(u) for u in units[-2:])
    return kw


def image_transform_meta(image_scale: Sequence[float], image_translate: Sequence[float]) -> dict[str, Any]:
    """What a Shapes layer records about the slide it annotates (for the writer's level-0 conversion)."""
    return {
        "image_scale": [float(s) for s in image_scale[-2:]],
        "image_translate": [float(t) for t in image_translate[-2:]],
    }


def layer_to_regions(
    data: Sequence[np.ndarray],
    shape_types: Sequence[str],
    features: pd.DataFrame | Mapping[str, Any] | None,
    *,
    layer_scale: Sequence[float] = (1.0, 1.0),
    layer_translate: Sequence[float] = (0.0, 0.0),
    image_scale: Sequence[float] | None = None,
    image_translate: Sequence[float] | None = None,
    indices: Sequence[int] | None = None,
    layer_name: str = "shapes",
) -> list[Region]:
    """Regions (level-0) for the shapes at ``indices`` (all by default) of a Shapes layer's state.

    Without an image transform the layer's data coordinates are taken as level-0 pixels.
    """
    if image_scale is None:
        image_scale, image_translate = layer_scale, layer_translate
    image_translate = (0.0, 0.0) if image_translate is None else image_translate
    df = normalise_features(features, len(data))
    out = []
    for i in range(len(data)) if indices is None else indices:
        row = df.iloc[i].to_dict()
        label = f"{layer_name} shape {i}" + (f" ({row['name']})" if row.get("name") else "")
        out.append(
            shape_to_region(
                data[i],
                shape_types[i],
                row,
                layer_scale=layer_scale,
                layer_translate=layer_translate,
                image_scale=image_scale,
                image_translate=image_translate,
                label=label,
            )
        )
    return out
