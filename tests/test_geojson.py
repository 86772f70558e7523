"""QuPath GeoJSON: the three export shapes, lossless round trip, clear errors naming file + feature."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from wsi_llava.errors import AnnotationError
from wsi_llava.slide.geojson import PRIVATE_KEY, find_region, read_geojson, region_to_feature, write_geojson
from wsi_llava.slide.region import Region

QUPATH_FEATURE = {
    "type": "Feature",
    "id": "2a5c1c0e-8f1c-4a49-9d0f-5d1f9e6c2b11",
    "geometry": {
        "type": "Polygon",
        "coordinates": [
            [[100, 200], [1100.5, 200], [1100.5, 900.25], [100, 900.25], [100, 200]],
            [[300, 300], [400, 300], [400, 400], [300, 300]],
        ],
    },
    "properties": {
        "objectType": "annotation",
        "name": "Tumor region 1",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "isLocked": False,
        "metadata": {"wsi_llava": {"answers": [{"q": "grade?", "a": "G2"}]}, "note": "ü ✓"},
        "measurements": {"Area µm^2": 1234.5},
    },
}

MULTI_FEATURE = {
    "type": "Feature",
    "id": "multi-1",
    "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
            [[[0, 0], [10, 0], [10, 10], [0, 0]]],
            [
                [[50, 50], [250, 50], [250, 250], [50, 250], [50, 50]],
                [[60, 60], [70, 60], [70, 70], [60, 60]],
            ],
        ],
    },
    "nucleusGeometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]},
    "properties": {"objectType": "detection", "classification": {"name": "Stroma"}},
}


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("shape", ["collection", "feature", "list"])
def test_reads_all_three_qupath_export_shapes(tmp_path, shape):
    data = {
        "collection": {"type": "FeatureCollection", "features": [QUPATH_FEATURE, MULTI_FEATURE]},
        "feature": QUPATH_FEATURE,
        "list": [QUPATH_FEATURE, MULTI_FEATURE],
    }[shape]
    regions = read_geojson(_write(tmp_path / "a.geojson", data))
    assert len(regions) == (1 if shape == "feature" else 2)
    r = regions[0]
    assert r.id == QUPATH_FEATURE["id"]
    assert r.name == "Tumor region 1"
    assert r.points == [(100.0, 200.0), (1100.5, 200.0), (1100.5, 900.25), (100.0, 900.25)]
    assert r.holes == [[(300.0, 300.0), (400.0, 300.0), (400.0, 400.0)]]
    assert r.properties == QUPATH_FEATURE["properties"]
    # the hole is honoured by contains()
    assert r.contains(np.array([150.0, 350.0]), np.array([250.0, 320.0])).tolist() == [True, False]


def test_multipolygon_is_its_largest_part_and_round_trips(tmp_path):
    (r,) = read_geojson(_write(tmp_path / "m.geojson", [MULTI_FEATURE]))
    assert r.points == [(50.0, 50.0), (250.0, 50.0), (250.0, 250.0), (50.0, 250.0)]
    assert len(r.holes) == 1
    assert r.id == "multi-1" and r.name is None
    assert {k: v for k, v in r.properties.items() if k != PRIVATE_KEY} == MULTI_FEATURE["properties"]
    feature = region_to_feature(r)
    assert feature["geometry"] == MULTI_FEATURE["geometry"]
    assert feature["nucleusGeometry"] == MULTI_FEATURE["nucleusGeometry"]
    assert PRIVATE_KEY not in feature["properties"]
    # an edited largest part goes back in its place, the other parts stay
    moved = r.model_copy(update={"points": [(x + 1, y) for x, y in r.points]})
    coords = region_to_feature(moved)["geometry"]["coordinates"]
    assert coords[0] == MULTI_FEATURE["geometry"]["coordinates"][0]
    assert coords[1][0][0] == [51, 50]


def test_round_trip_keeps_geometry_and_every_property(tmp_path):
    src = _write(
        tmp_path / "in.geojson", {"type": "FeatureCollection", "features": [QUPATH_FEATURE, MULTI_FEATURE]}
    )
    regions = read_geojson(src)
    out = tmp_path / "out.geojson"
    write_geojson(out, regions)
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["type"] == "FeatureCollection"
    for orig, feat in zip([QUPATH_FEATURE, MULTI_FEATURE], written["features"], strict=True):
        assert feat["id"] == orig["id"]
        assert feat["geometry"] == orig["geometry"]
        assert feat["properties"] == orig["properties"]
    assert read_geojson(out) == regions
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_adds_objecttype_and_name_and_keeps_given_properties(tmp_path):
    r = Region.rectangle(
        10, 20, 30, 40, id="r1", name="box", properties={"metadata": {"k": [1, {"n": None}]}}
    )
    out = tmp_path / "new.geojson"
    write_geojson(out, [r])
    (feat,) = json.loads(out.read_text())["features"]
    assert feat["id"] == "r1"
    assert feat["properties"] == {
        "metadata": {"k": [1, {"n": None}]},
        "objectType": "annotation",
        "name": "box",
    }
    assert feat["geometry"] == {
        "type": "Polygon",
        "coordinates": [[[10, 20], [40, 20], [40, 60], [10, 60], [10, 20]]],
    }
    (back,) = read_geojson(out)
    assert back.kind == "rectangle" and back.points == r.points and back.id == "r1" and back.name == "box"


def test_write_is_atomic_on_failure(tmp_path):
    out = tmp_path / "keep.geojson"
    out.write_text("original")
    bad = Region.rectangle(0, 0, 5, 5, properties={"x": object()})  # not JSON-serialisable
    with pytest.raises(AnnotationError, match="keep.geojson"):
        write_geojson(out, [bad])
    assert out.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.geojson"]


def test_id_from_properties_when_feature_has_none(tmp_path):
    feat = {
        "type": "Feature",
        "geometry": QUPATH_FEATURE["geometry"],
        "properties": {"id": "p-7", "name": "n"},
    }
    (r,) = read_geojson(_write(tmp_path / "p.geojson", [feat]))
    assert r.id == "p-7"


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", r"not valid JSON"),
        (
            json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]}),
            r"feature 0.*no geometry",
        ),
        (
            json.dumps(
                [QUPATH_FEATURE, {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]
            ),
            r"feature 1.*'Point' is not supported",
        ),
        (json.dumps([{"type": "Feature", "geometry": {"type": "Polygon"}}]), r"feature 0.*no 'coordinates'"),
        (
            json.dumps(
                [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], ["a", 1]]]}}]
            ),
            r"feature 0.*pair of numbers",
        ),
        (
            json.dumps(
                [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]},
                    }
                ]
            ),
            r"feature 0.*3 distinct",
        ),
        (json.dumps({"type": "Topology"}), r"expected a GeoJSON FeatureCollection"),
    ],
)
def test_malformed_geojson_names_file_and_feature(tmp_path, content, expected):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=expected) as info:
        read_geojson(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="no such GeoJSON file"):
        read_geojson(tmp_path / "nope.geojson")


def test_skip_unsupported_geometries_in_one_summary_line(tmp_path, caplog):
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}
    line = {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[1, 2], [3, 4]]}}
    null = {"type": "Feature", "geometry": None, "properties": {}}
    collection = {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": []}}
    path = _write(tmp_path / "mixed.geojson", [point] * 300 + [line, null, QUPATH_FEATURE, collection])
    with caplog.at_level(logging.WARNING, logger="wsi_llava.slide.geojson"):
        assert [r.id for r in read_geojson(path, skip_unsupported=True)] == [QUPATH_FEATURE["id"]]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 303 features that are not polygons "
        "(300 Point, 1 GeometryCollection, 1 LineString, 1 no geometry)"
    ]


def test_find_region_by_id_or_name_and_lists_available(tmp_path):
    regions = read_geojson(_write(tmp_path / "f.geojson", [QUPATH_FEATURE, MULTI_FEATURE]))
    assert find_region(regions, "multi-1", "f.geojson").id == "multi-1"
    assert find_region(regions, "Tumor region 1", "f.geojson").id == QUPATH_FEATURE["id"]
    with pytest.raises(AnnotationError) as e:
        find_region(regions, "x", "f.geojson")
    assert str(e.value) == (
        "f.geojson: no annotation with id or name 'x'; choose one with --id or --index:\n"
        f"  --index 0: id '{QUPATH_FEATURE['id']}', name 'Tumor region 1'\n"
        "  --index 1: id 'multi-1', no name"
    )
    twins = [
        Region.rectangle(0, 0, 1, 1, id="a", name="same"),
        Region.rectangle(0, 0, 1, 1, id="b", name="same"),
    ]
    with pytest.raises(AnnotationError, match="2 annotations have the name 'same'; choose one with --index"):
        find_region(twins, "same", "t.geojson")


# --- QuPath's own writer: NaN, Infinity -------------------------------------------------------------
QUPATH_NAN_TEXT = (
    '{"type":"FeatureCollection","features":[{"type":"Feature","id":"5e1c3a4b-0f7d-4a8e-9c21-0d3b6f1e2a77",'
    '"geometry":{"type":"Polygon","coordinates":[[[10,10],[90,10],[90,90],[10,90],[10,10]]]},'
    '"properties":{"objectType":"annotation","classification":{"name":"Tumor","color":[200,0,0]},'
    '"name":"T1","measurements":{"Area px^2":6400.0,"Mean: Red":NaN,"Max":Infinity,"Min":-Infinity}}}]}'
)


def test_reads_and_writes_nan_as_qupath_does(tmp_path):
    src = tmp_path / "qupath.geojson"
    src.write_text(QUPATH_NAN_TEXT)
    (r,) = read_geojson(src)
    m = r.properties["measurements"]
    assert math.isnan(m["Mean: Red"]) and m["Max"] == math.inf and m["Min"] == -math.inf
    out = tmp_path / "out.geojson"
    write_geojson(out, [r])
    text = out.read_text()
    assert '"Mean: Red": NaN' in text and '"Max": Infinity' in text and '"Min": -Infinity' in text
    (back,) = read_geojson(out)
    assert math.isnan(back.properties["measurements"]["Mean: Red"]) and back.points == r.points


# --- deeply nested input ------------------------------------------------------------------------------
def test_deeply_nested_json_is_one_clear_error(tmp_path):
    deep = tmp_path / "deep.geojson"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AnnotationError, match=r"deep\.geojson: nested too deeply"):
        read_geojson(deep)
    # loads, but deeper than any QuPath export: refused before copies and writes overflow on it
    feature = json.loads(json.dumps(QUPATH_FEATURE))
    feature["properties"]["metadata"]["x"] = json.loads("[" * 600 + "]" * 600)
    path = tmp_path / "deep_props.geojson"
    path.write_text(json.dumps([feature]))
    with pytest.raises(AnnotationError, match=r"deep_props\.geojson: feature 0: nested more than 100 levels"):
        read_geojson(path)
    # a position hiding a nested value is not a position
    bad = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0, [[5]]], [1, 1]]]},
    }
    with pytest.raises(AnnotationError, match=r"feature 0: position \(a nested list\) is not a pair"):
        read_geojson(_write(tmp_path / "pos.geojson", [bad]))


# --- shape label ------------------------------------------------------------------------------------------
def test_bow_tie_with_rectangle_corners_is_a_polygon(tmp_path):
    def feat(ring):
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}}

    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    bow_tie = [[0, 0], [10, 10], [10, 0], [0, 10]]  # the same corners, visited crosswise
    other_tie = [[0, 0], [10, 0], [0, 10], [10, 10]]
    kinds = [
        r.kind
        for r in read_geojson(_write(tmp_path / "s.geojson", [feat(square), feat(bow_tie), feat(other_tie)]))
    ]
    assert kinds == ["rectangle", "polygon", "polygon"]


def test_control_characters_in_names_are_escaped_in_messages(tmp_path):
    feature = {
        "type": "Feature",
        "id": "\x1b[2J\x1b[31mred",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], ["a", 1]]]},
    }
    with pytest.raises(AnnotationError) as e:
        read_geojson(_write(tmp_path / "c.geojson", [feature]))
    assert "\x1b" not in str(e.value) and "(\\x1b[2J\\x1b[31mred)" in str(e.value)
