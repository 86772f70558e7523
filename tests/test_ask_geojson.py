"""``wsi-llava ask SLIDE Q --geojson F [--id X | --index N]``: which annotation, and what the messages say.

Files are QuPath exports in QuPath's layout; the selection errors come before any slide or model
work, so most tests need no slide. One test asks a real (tiny) model about the chosen annotation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from click.testing import CliRunner

from wsi_llava.cli import cli
from wsi_llava.slide.geojson import select_region

SLIDE = "never-opened.svs"  # selection fails before the slide is opened


def _feature(ring, fid=None, name=None, **props):
    feature = {"type": "Feature"}
    if fid is not None:
        feature["id"] = fid
    feature["geometry"] = {"type": "Polygon", "coordinates": [ring + ring[:1]]}
    properties = {"objectType": "annotation", **props}
    if name is not None:
        properties["name"] = name
    feature["properties"] = properties
    return feature


def _square(x, y, s=400):
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s]]


OTHERS = [
    {"type": "Feature", "id": "p1", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": [[0, 0], [9, 9]]},
        "properties": {"objectType": "annotation", "name": "ruler"},
    },
    {"type": "Feature", "geometry": None, "properties": {"objectType": "annotation"}},
    {
        "type": "Feature",
        "geometry": {"type": "GeometryCollection", "geometries": []},
        "properties": {"objectType": "annotation"},
    },
]


def _file(tmp_path: Path, features, name="ann.geojson") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _ask(*args: str):
    return CliRunner().invoke(cli, ["ask", *args], catch_exceptions=False)


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    return result.output


def test_other_geometries_are_skipped_with_one_note(world, tiny_model, tmp_path, caplog):  # noqa: F811
    target = _feature(_square(600, 600), "a-2", "Tumour")
    path = _file(tmp_path, [*OTHERS, _feature(_square(100, 100), "a-1", "Stroma"), target])
    slide = str(world / "slides" / "slide_000.tif")
    common = ["--model", tiny_model, "--max-new-tokens", "2", "--json"]
    with caplog.at_level(logging.WARNING, logger="wsi_llava.slide.geojson"):
        r = _ask(slide, "What is here?", "--geojson", str(path), "--id", "a-2", *common)
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert answer["scope"] == "region" and answer["region"]["id"] == "a-2"
    assert answer["region"]["points"] == [list(map(float, p)) for p in _square(600, 600)]
    notes = [rec.getMessage() for rec in caplog.records if rec.name == "wsi_llava.slide.geojson"]
    assert notes == [
        f"{path}: skipped 4 features that are not polygons "
        "(1 GeometryCollection, 1 LineString, 1 Point, 1 no geometry)"
    ]
    assert select_region(path, index=5).id == "a-2" and select_region(path, "Stroma").id == "a-1"


def test_duplicate_ids_are_refused_naming_the_id(tmp_path):
    # QuPath 0.2 gave every annotation the id "PathAnnotationObject": taking the first would be a guess
    path = _file(
        tmp_path,
        [
            _feature(_square(0, 0), "PathAnnotationObject", "Tumour"),
            _feature(_square(500, 0), "PathAnnotationObject", "Stroma"),
        ],
    )
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(path), "--id", "PathAnnotationObject"))
    assert "2 annotations have the id 'PathAnnotationObject'; choose one with --index" in out
    assert "--index 0: id 'PathAnnotationObject', name 'Tumour'" in out
    assert "--index 1: id 'PathAnnotationObject', name 'Stroma'" in out


def test_no_ids_or_names_says_how_to_choose(tmp_path):
    path = _file(tmp_path, [_feature(_square(0, 0)), _feature(_square(500, 0))])
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(path)))
    assert f"{path}: holds 2 annotations; choose one with --id (its id or name) or --index:" in out
    assert "--index 0: no id, no name" in out and "--index 1: no id, no name" in out
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(path), "--index", "7"))
    assert "no polygon annotation at --index 7; choose one of:" in out and "--index 1: no id" in out
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(path), "--index", "0", "--id", "x"))
    assert "--id or with --index, not both" in out


def test_empty_collection_says_it_holds_none(tmp_path):
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(_file(tmp_path, []))))
    assert "holds no polygon annotations to ask about" in out and "0 annotations" not in out
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(_file(tmp_path, OTHERS[:2], "points.geojson"))))
    assert "holds no polygon annotations to ask about; skipped 2 features that are not polygons" in out


def test_control_characters_in_names_are_escaped(tmp_path):
    path = _file(
        tmp_path, [_feature(_square(0, 0), "a1", "\x1b[2J\x1b[31mred\nline"), _feature(_square(9, 9))]
    )
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(path), "--id", "nope\x07"))
    assert "\x1b" not in out and "\x07" not in out
    assert "name '\\x1b[2J\\x1b[31mred\\nline'" in out and "'nope\\x07'" in out


def test_many_annotations_without_id_are_listed_up_to_a_limit(tmp_path):
    path = _file(tmp_path, [_feature(_square(i * 10, 0, 5), f"id-{i}", f"A{i}") for i in range(25)])
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(path)))
    assert "holds 25 annotations; choose one with --id (its id or name) or --index:" in out
    assert "--index 0: id 'id-0', name 'A0'" in out and "--index 19: id 'id-19', name 'A19'" in out
    assert "--index 20:" not in out and "... and 5 more" in out
    out = _error(_ask(SLIDE, "Q?", "--geojson", str(path), "--id", "zzz"))
    assert "no annotation with id or name 'zzz'" in out and "... and 5 more" in out
