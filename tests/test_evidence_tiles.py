"""Which tiles of an answer's evidence are relevant, their relevance value, and their QuPath detection form."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from wsi_llava.answer import Evidence
from wsi_llava.evidence_tiles import (
    EVIDENCE_CLASS,
    RELEVANCE_MEASUREMENT,
    EvidenceSelection,
    evidence_features,
    is_evidence_feature,
    relative_relevance,
    relevant_tiles,
    replace_evidence,
)
from wsi_llava.slide.region import Region


def _evidence(scores: list[float], tile: int = 100) -> Evidence:
    coords = [((i % 4) * tile, (i // 4) * tile) for i in range(len(scores))]
    return Evidence(tile_indices=list(range(len(scores))), coords=coords, scores=scores, tile_size=tile)


def test_relevance_is_relative_to_the_top_tile():
    rel = relative_relevance(_evidence([0.1, 0.4, 0.0, 0.5]))
    assert rel.tolist() == pytest.approx([0.2, 0.8, 0.0, 1.0])
    assert relative_relevance(_evidence([0.0, 0.0])).tolist() == [0.0, 0.0]
    assert relative_relevance(Evidence()).size == 0


def test_relevant_tiles_hold_the_mass_most_relevant_first_capped():
    ev = _evidence([0.05, 0.3, 0.0, 0.5, 0.15])
    tiles = relevant_tiles(ev)  # 0.5 + 0.3 + 0.15 = 0.95 >= 0.9
    assert [t.index for t in tiles] == [3, 1, 4]
    assert [t.relevance for t in tiles] == pytest.approx([1.0, 0.6, 0.3])
    assert (tiles[0].x, tiles[0].y, tiles[0].size) == (300, 0, 100)
    assert tiles[0].square == [[300, 0], [400, 0], [400, 100], [300, 100], [300, 0]]
    assert [t.index for t in relevant_tiles(ev, EvidenceSelection(mass=0.5))] == [3]
    assert [t.index for t in relevant_tiles(ev, EvidenceSelection(mass=0.8))] == [3, 1]  # exactly the mass
    assert [t.index for t in relevant_tiles(ev, EvidenceSelection(mass=1.0))] == [3, 1, 4, 0]  # never a 0
    assert [t.index for t in relevant_tiles(ev, EvidenceSelection(max_tiles=2))] == [3, 1]
    # ties keep the grid's order; no signal, no tiles
    assert [t.index for t in relevant_tiles(_evidence([0.25] * 4), EvidenceSelection(mass=0.5))] == [0, 1]
    assert relevant_tiles(_evidence([0.0, 0.0])) == [] and relevant_tiles(Evidence()) == []
    with pytest.raises(ValidationError):
        EvidenceSelection(mass=0)
    with pytest.raises(ValidationError):
        EvidenceSelection(max_tiles=0)


def test_detections_in_both_measurement_forms():
    ev = _evidence([0.2, 0.8])
    new, old = evidence_features(ev), evidence_features(ev, legacy_measurements=True)
    assert [f["properties"]["measurements"] for f in new] == [
        {RELEVANCE_MEASUREMENT: 1.0},
        {RELEVANCE_MEASUREMENT: 0.25},
    ]
    assert old[0]["properties"]["measurements"] == [{"name": RELEVANCE_MEASUREMENT, "value": 1.0}]
    assert all(is_evidence_feature(f) for f in new + old) and new[0]["id"] != old[0]["id"]
    assert new[0]["properties"]["classification"]["name"] == EVIDENCE_CLASS
    other = {
        "type": "Feature",
        "properties": {"objectType": "detection", "classification": {"name": "Tumor"}},
    }
    annotation = {
        "type": "Feature",
        "properties": {"objectType": "annotation", "classification": EVIDENCE_CLASS},
    }
    assert (
        not is_evidence_feature(other) and not is_evidence_feature(annotation) and not is_evidence_feature([])
    )


def test_replace_evidence_only_touches_the_answered_regions_tiles():
    left = Region.rectangle(
        0, 0, 200, 200, name="left", properties={"measurements": [{"name": "A", "value": 1}]}
    )
    old_left = evidence_features(_evidence([1.0]))  # a tile at (0, 0): centre inside ``left``
    old_right = [dict(f, id="keep") for f in evidence_features(_evidence([1.0]))]
    old_right[0]["geometry"]["coordinates"] = [[[1000, 0], [1100, 0], [1100, 100], [1000, 100], [1000, 0]]]
    user = {"type": "Feature", "id": "u", "geometry": None, "properties": {"objectType": "annotation"}}
    features = [user, *old_left, *old_right]
    new = _evidence([0.3, 0.7])
    out, removed, added = replace_evidence(features, [(left, new)])
    assert (removed, added) == (1, 2) and out[:2] == [user, *old_right]
    # ``left`` holds QuPath <= 0.3 measurements: so do its tiles
    assert [f["properties"]["measurements"] for f in out[2:]] == [
        [{"name": RELEVANCE_MEASUREMENT, "value": 1.0}],
        [{"name": RELEVANCE_MEASUREMENT, "value": pytest.approx(3 / 7, abs=1e-6)}],
    ]
    # a tile the question covered counts as the region's even when its centre lies outside (small regions)
    tiny = Region.rectangle(90, 90, 20, 20)
    covering = Evidence(tile_indices=[0], coords=[(0, 0)], scores=[1.0], tile_size=100)
    out, removed, _ = replace_evidence(old_left, [(tiny, covering)])
    assert removed == 1 and len(out) == 1 and out[0]["id"] != old_left[0]["id"]
