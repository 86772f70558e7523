"""npe2 writer: a Shapes layer (with its answers and descriptions) as QuPath GeoJSON, level-0 pixels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from napari_wsi_llava._shapes import META_KEY, layer_to_regions
from wsi_llava.slide.geojson import write_geojson

logger = logging.getLogger(__name__)


def write_shapes_geojson(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Shapes layer to ``path`` as a QuPath FeatureCollection (atomic); returns ``[path]``.

    Names go to ``properties.name``, descriptions to ``properties.metadata.ANNOTATION_DESCRIPTION``,
    answers to ``metadata["wsi_llava.*"]``; every property an imported annotation had is kept.
    """
    if not str(path).lower().endswith(".geojson"):
        path = f"{path}.geojson"
    meta = (attributes.get("metadata") or {}).get(META_KEY) or {}
    regions = layer_to_regions(
        data,
        attributes.get("shape_type") or ["polygon"] * len(data),
        attributes.get("features"),
        layer_scale=attributes.get("scale", (1.0, 1.0)),
        layer_translate=attributes.get("translate", (0.0, 0.0)),
        image_scale=meta.get("image_scale"),
        image_translate=meta.get("image_translate"),
        layer_name=str(attributes.get("name", "shapes")),
    )
    write_geojson(path, regions)
    logger.info("wrote %d annotations to %s", len(regions), path)
    return [str(Path(path))]
