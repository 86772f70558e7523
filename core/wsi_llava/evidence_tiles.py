"""An answer's relevant tiles, and those tiles as QuPath detection objects.

One rule for every frontend (the QuPath bridge, ``wsi-llava describe``, the evidence PNG): a tile's
*relevance* is its evidence score relative to the answer's most relevant tile (top tile = 1, a tile the
answer ignored = 0), so values read the same for a 20-tile region and a 20,000-tile slide. The *relevant
tiles* are the most relevant ones that together hold ``mass`` (default 90 %) of the answer's relevance
scores, at most ``max_tiles`` of them. As QuPath objects they are square detections of the tile's
level-0 extent, classified :data:`EVIDENCE_CLASS`, with one measurement :data:`RELEVANCE_MEASUREMENT`
(what QuPath's Measurement Maps colour by). An evidence detection belongs to the annotation whose tiles
it covers; asking about that annotation again replaces it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from wsi_llava.annotate import MEASUREMENT_PREFIX, merge_measurements
from wsi_llava.answer import Evidence
from wsi_llava.slide.region import Region

#: QuPath classification of evidence detections
EVIDENCE_CLASS = f"{MEASUREMENT_PREFIX} evidence"
#: the measurement holding a tile's relevance (0..1, the answer's top tile = 1)
RELEVANCE_MEASUREMENT = f"{MEASUREMENT_PREFIX} relevance"
#: colour of the evidence class (RGB); Measurement Maps recolour by relevance
EVIDENCE_COLOR = (230, 85, 13)
#: share of the answer's relevance that the relevant tiles hold
DEFAULT_MASS = 0.9
#: most relevant tiles written per answer
DEFAULT_MAX_TILES = 300
#: how ``--help`` and the docs say which tiles are written
SELECTION_HELP = (
    "the most relevant tiles that together hold {mass:g} % of the answer's relevance, at most {n} of "
    "them; each gets the measurement 'WSI-LLaVA relevance' (0-1, the answer's most relevant tile = 1)"
)


class EvidenceSelection(BaseModel):
    """Which tiles of an answer's evidence are written: a share of the relevance mass, and a cap."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mass: float = Field(DEFAULT_MASS, gt=0, le=1, description="share of the relevance the tiles hold")
    max_tiles: int = Field(DEFAULT_MAX_TILES, ge=1, description="most tiles per answer")

    def describe(self) -> str:
        """The selection in words (for help texts and messages)."""
        return SELECTION_HELP.format(mass=self.mass * 100, n=self.max_tiles)


class EvidenceTile(BaseModel):
    """One relevant tile: its position in the tile grid, its level-0 square and its relevance."""

    model_config = ConfigDict(extra="forbid")

    index: int
    x: int
    y: int
    size: int
    relevance: float = Field(ge=0, le=1)

    @property
    def square(self) -> list[list[int]]:
        """The tile's closed level-0 ring, as GeoJSON writes a polygon."""
        x0, y0, x1, y1 = self.x, self.y, self.x + self.size, self.y + self.size
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def relative_relevance(evidence: Evidence) -> np.ndarray:
    """Each evidence tile's relevance relative to the most relevant one (float64, 0..1; all 0 without signal)."""
    scores = np.asarray(evidence.scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    scores = np.where(np.isfinite(scores) & (scores > 0), scores, 0.0)
    top = float(scores.max())
    return scores / top if top > 0 else scores


def relevant_tiles(evidence: Evidence, selection: EvidenceSelection | None = None) -> list[EvidenceTile]:
    """The relevant tiles of ``evidence`` (see the module docstring), most relevant first.

    Tiles with no relevance are never included; evidence without scores gives none.
    """
    selection = selection or EvidenceSelection()
    relevance = relative_relevance(evidence)
    if relevance.size == 0 or evidence.tile_size <= 0 or not relevance.any():
        return []
    if not len(evidence.coords) == len(evidence.tile_indices) == relevance.size:
        raise ValueError("evidence: tile_indices, coords and scores differ in length")
    order = np.argsort(-relevance, kind="stable")  # ties keep the grid's row-major order
    cumulative = np.cumsum(relevance[order])
    n = int(np.searchsorted(cumulative, selection.mass * cumulative[-1] * (1 - 1e-12))) + 1
    n = min(n, selection.max_tiles, int(np.count_nonzero(relevance)))
    return [
        EvidenceTile(
            index=int(evidence.tile_indices[i]),
            x=int(evidence.coords[i][0]),
            y=int(evidence.coords[i][1]),
            size=int(evidence.tile_size),
            relevance=round(float(relevance[i]), 6),
        )
        for i in order[:n]
    ]


# --- QuPath detections ----------------------------------------------------------------------------
def detection_feature(tile: EvidenceTile, legacy_measurements: bool = False) -> dict[str, Any]:
    """``tile`` as a QuPath GeoJSON detection (a new object id, as QuPath gives every object).

    ``legacy_measurements``: QuPath <= 0.3's list of ``{name, value}`` instead of an object.
    """
    measurements = merge_measurements(
        [] if legacy_measurements else {}, {RELEVANCE_MEASUREMENT: tile.relevance}
    )
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [tile.square]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": EVIDENCE_CLASS, "color": list(EVIDENCE_COLOR)},
            "measurements": measurements,
        },
    }


def evidence_features(
    evidence: Evidence, selection: EvidenceSelection | None = None, legacy_measurements: bool = False
) -> list[dict[str, Any]]:
    """The relevant tiles of ``evidence`` as QuPath GeoJSON detections, most relevant first."""
    return [detection_feature(t, legacy_measurements) for t in relevant_tiles(evidence, selection)]


def _class_name(classification: Any) -> str | None:
    if isinstance(classification, str):
        return classification
    if isinstance(classification, dict):
        names = classification.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return ": ".join(names)
        name = classification.get("name")
        return name if isinstance(name, str) else None
    return None


def is_evidence_feature(feature: Any) -> bool:
    """Whether a GeoJSON feature is an evidence detection that wsi-llava wrote."""
    props = feature.get("properties") if isinstance(feature, dict) else None
    if not isinstance(props, dict):
        return False
    otype = props.get("objectType", props.get("object_type"))
    return otype == "detection" and _class_name(props.get("classification")) == EVIDENCE_CLASS


def _square_of(feature: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """``(xmin, ymin, xmax, ymax)`` of a polygon feature's outer ring, or None if it has none."""
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict) or geometry.get("type") != "Polygon":
        return None
    try:
        ring = np.asarray(geometry["coordinates"][0], dtype=np.float64)
        return (
            float(ring[:, 0].min()),
            float(ring[:, 1].min()),
            float(ring[:, 0].max()),
            float(ring[:, 1].max()),
        )
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class _Owner:
    """An answered region and the tile squares its question covered, for :func:`replace_evidence`."""

    def __init__(self, region: Region, evidence: Evidence) -> None:
        self.region = region
        self.size = int(evidence.tile_size)
        self.tiles = {(int(x), int(y)) for x, y in evidence.coords}

    def owns(self, feature: dict[str, Any]) -> bool:
        """Whether an evidence detection is this region's: it covers one of the tiles the region's
        question covered, or its centre lies inside the region (QuPath's own parent rule)."""
        box = _square_of(feature)
        if box is None:
            return False
        x0, y0, x1, y1 = box
        if (
            self.size > 0
            and (x1 - x0, y1 - y0) == (self.size, self.size)
            and (int(x0), int(y0)) in self.tiles
        ):
            return True
        return bool(self.region.contains(np.array([(x0 + x1) / 2]), np.array([(y0 + y1) / 2]))[0])


def replace_evidence(
    features: Sequence[Any],
    answered: Sequence[tuple[Region, Evidence]],
    selection: EvidenceSelection | None = None,
) -> tuple[list[Any], int, int]:
    """``features`` with the evidence detections of each answered region replaced by its new relevant tiles.

    ``answered``: each described region (as written, so its measurement form is known) and its answer's
    evidence. Every other feature stays where it was; the new detections follow the last feature, in the
    order of ``answered``. Returns ``(features, n_removed, n_added)``.
    """
    owners = [_Owner(region, evidence) for region, evidence in answered]
    kept: list[Any] = []
    removed = 0
    for feature in features:
        if is_evidence_feature(feature) and any(o.owns(feature) for o in owners):
            removed += 1
            continue
        kept.append(feature)
    added: list[dict[str, Any]] = []
    for region, evidence in answered:
        legacy = isinstance(region.properties.get("measurements"), list)
        added.extend(evidence_features(evidence, selection, legacy_measurements=legacy))
    return kept + added, removed, len(added)
