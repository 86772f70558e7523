"""Answers written into QuPath GeoJSON (``wsi_llava.annotate``) and ``wsi-llava describe`` (batch, files).

A QuPath export with unusual properties (derived classes with colours, metadata, NaN measurements
in both forms, holes, MultiPolygons, a cell with a nucleus, points and lines) goes through the
command and loses nothing.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsi_llava.annotate import (
    DESCRIPTION_KEY,
    AnnotationUpdate,
    annotate_region,
    apply_to_properties,
    description_of,
    merge_description,
    numeric_answer,
    short_name,
    update_from_answer,
)
from wsi_llava.answer import Answer, Evidence
from wsi_llava.describe import describe_command, describe_regions
from wsi_llava.errors import WsiLlavaError
from wsi_llava.slide.region import Region

WHEN = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)


def _update(**kw) -> AnnotationUpdate:
    return AnnotationUpdate(
        **{"question": "Is there necrosis?", "answer": "Yes, focal necrosis.", "when": WHEN, **kw}
    )


# --- annotate --------------------------------------------------------------------------------------
def test_description_is_set_appended_or_overwritten():
    props = {"objectType": "annotation", "color": [1, 2, 3], "metadata": {"other": "x"}}
    out = apply_to_properties(props, _update())
    assert out["metadata"] == {"other": "x", DESCRIPTION_KEY: "Yes, focal necrosis."}
    assert props == {
        "objectType": "annotation",
        "color": [1, 2, 3],
        "metadata": {"other": "x"},
    }  # input intact
    assert {k: v for k, v in out.items() if k != "metadata"} == {
        "objectType": "annotation",
        "color": [1, 2, 3],
    }

    again = apply_to_properties(out, _update(question="Grade?", answer="Grade II."))
    assert again["metadata"][DESCRIPTION_KEY] == (
        "Yes, focal necrosis.\n\n--- WSI-LLaVA, 2026-11-27 09:30 UTC: Grade?\nGrade II."
    )
    over = apply_to_properties(out, _update(answer="No."), overwrite=True)
    assert over["metadata"][DESCRIPTION_KEY] == "No."
    assert merge_description("   ", _update()) == "Yes, focal necrosis."
    assert description_of(over) == "No." and description_of({}) is None


def test_name_and_measurements():
    props = {"name": "Tumor 1", "measurements": {"Area": 5.0, "WSI-LLaVA tiles": 1.0}}
    out = apply_to_properties(props, _update(measurements={"WSI-LLaVA tiles": 7}))
    assert out["name"] == "Tumor 1"  # no short name asked: kept
    assert out["measurements"] == {"Area": 5.0, "WSI-LLaVA tiles": 7.0}
    out = apply_to_properties(props, _update(name="Necrosis"))
    assert out["name"] == "Necrosis" and out["measurements"] == props["measurements"]
    # QuPath's older array form stays an array
    legacy = {"measurements": [{"name": "Area", "value": 5.0}, {"name": "WSI-LLaVA tiles", "value": 1.0}]}
    out = apply_to_properties(legacy, _update(measurements={"WSI-LLaVA tiles": 3}))
    assert out["measurements"] == [{"name": "Area", "value": 5.0}, {"name": "WSI-LLaVA tiles", "value": 3.0}]
    with pytest.raises(ValueError, match="finite"):
        apply_to_properties({}, _update(measurements={"bad": float("nan")}))


def test_update_from_answer():
    ans = Answer(
        question="What percentage is tumour?",
        answer="35 %",
        scope="region",
        model="m",
        notice="demo model",
        evidence=Evidence(tile_indices=[1, 2, 3]),
    )
    up = update_from_answer(ans, set_name=True)
    assert up.answer == "35 %\n[demo model]"
    assert up.measurements == {"WSI-LLaVA tiles": 3.0, "WSI-LLaVA answer": 35.0}
    assert up.name == "35 %"
    assert update_from_answer(ans).name is None
    assert numeric_answer("The tumour is large.") is None and numeric_answer("-2.5.") == -2.5
    long = "Invasive ductal carcinoma with extensive comedo necrosis and lymphovascular invasion. More."
    name = short_name(long)
    assert len(name) <= 48 and name.endswith("…") and long.startswith(name[:-1])
    region = Region.rectangle(0, 0, 10, 10, name="old", properties={"name": "old"})
    new = annotate_region(region, up)
    assert new.name == "35 %" and new.properties["name"] == "35 %" and region.properties == {"name": "old"}


# --- batch -----------------------------------------------------------------------------------------
def test_describe_regions_reports_one_failure_and_continues(world, tiny_model):
    from wsi_llava.session import SlideSession

    inside = Region.rectangle(200, 200, 600, 600, name="in")
    outside = Region.rectangle(5000, 5000, 100, 100, name="out")
    seen, steps = [], []
    with SlideSession(world / "slides" / "slide_000.tif", tiny_model) as s:
        report = describe_regions(
            s,
            [outside, inside],
            "Describe it.",
            max_new_tokens=3,
            progress=lambda d, t, m: steps.append((d, t)),
            on_result=seen.append,
        )
        with pytest.raises(WsiLlavaError, match="question is empty"):
            describe_regions(s, [inside], " ")
    assert [r.ok for r in report.results] == [False, True] and report.n_ok == 1
    assert "lie outside the slide" in report.results[0].error and report.results[0].region == outside
    assert description_of(report.results[1].region.properties)
    assert steps == [(0, 2), (1, 2), (2, 2)] and len(seen) == 2


# --- the describe command on a QuPath export ------------------------------------------------------
def _qupath_export() -> dict:
    square = [[100, 100], [900, 100], [900, 900], [100, 900], [100, 100]]
    hole = [[300, 300], [500, 300], [500, 500], [300, 500], [300, 300]]
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "0d5b0b3c-0000-4000-8000-000000000001",
                "geometry": {"type": "Polygon", "coordinates": [square, hole]},
                "properties": {
                    "objectType": "annotation",
                    "name": "Tumour with hole",
                    "color": [255, 0, 0],
                    "isLocked": True,
                    "classification": {"names": ["Tumor", "Positive"], "color": [200, 0, 0, 128]},
                    "metadata": {DESCRIPTION_KEY: "Pathologist note.", "source": "manual"},
                    "measurements": {"Area µm^2": 160000.0, "Odd": "NaN", "Big": "Infinity"},
                },
            },
            {
                "type": "Feature",
                "id": "0d5b0b3c-0000-4000-8000-000000000002",
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [
                        [[[1000, 1000], [1600, 1000], [1600, 1600], [1000, 1600], [1000, 1000]]],
                        [[[1700, 100], [1800, 100], [1800, 200], [1700, 200], [1700, 100]]],
                    ],
                },
                "plane": {"c": -1, "z": 0, "t": 0},
                "properties": {
                    "objectType": "annotation",
                    "classification": "Stroma",
                    "measurements": [{"name": "Legacy", "value": 1.5}],
                },
            },
            {
                "type": "Feature",
                "id": "0d5b0b3c-0000-4000-8000-000000000003",
                "geometry": {"type": "Point", "coordinates": [50, 50]},
                "properties": {"objectType": "annotation", "name": "a point"},
            },
            {
                "type": "Feature",
                "geometry": {"type": "LineString", "coordinates": [[0, 0], [10, 10]]},
                "properties": {"objectType": "annotation", "name": "a line"},
            },
            {
                "type": "Feature",
                "id": "0d5b0b3c-0000-4000-8000-000000000005",
                "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [20, 10], [20, 20], [10, 10]]]},
                "nucleusGeometry": {
                    "type": "Polygon",
                    "coordinates": [[[12, 12], [14, 12], [14, 14], [12, 12]]],
                },
                "properties": {
                    "objectType": "cell",
                    "name": "a cell",
                    "measurements": {"Nucleus: Area": 2.0},
                },
            },
            {
                "type": "Feature",
                "id": "0d5b0b3c-0000-4000-8000-000000000006",
                "geometry": {"type": "Polygon", "coordinates": [square]},
                "properties": {"objectType": "annotation", "name": "Second"},
            },
        ],
    }


def _invoke(*args: str):
    return CliRunner().invoke(describe_command, list(args), catch_exceptions=False)


def test_describe_command_round_trip_loses_nothing(world, tiny_model, tmp_path):
    src = _qupath_export()
    inp = tmp_path / "exported.geojson"
    inp.write_text(json.dumps(src))
    out = tmp_path / "described.geojson"
    slide = world / "slides" / "slide_000.tif"
    r = _invoke(
        "--slide",
        str(slide),
        "--geojson",
        str(inp),
        "-o",
        str(out),
        "--model",
        tiny_model,
        "--max-new-tokens",
        "3",
        "--question",
        "Describe this.",
    )
    assert r.exit_code == 0, r.output
    assert "described 3 of 3 annotations" in r.output
    got = json.loads(out.read_text())
    assert got["type"] == "FeatureCollection" and len(got["features"]) == len(src["features"])
    orig = src["features"]
    for i in (2, 3, 4):  # point, line, cell: byte for byte the same
        assert got["features"][i] == orig[i]
    for i in (0, 1, 5):
        g, o = got["features"][i], orig[i]
        assert g["geometry"] == o["geometry"] and g.get("id") == o.get("id")
        assert {k: v for k, v in g.items() if k != "properties"} == {
            k: v for k, v in o.items() if k != "properties"
        }
        gp, op = copy.deepcopy(g["properties"]), copy.deepcopy(o["properties"])
        desc = gp["metadata"].pop(DESCRIPTION_KEY)
        old_desc = op.get("metadata", {}).pop(DESCRIPTION_KEY, None)
        if old_desc:
            assert desc.startswith(old_desc + "\n\n--- WSI-LLaVA, ") and "Describe this." in desc
        else:
            assert desc.strip() and "---" not in desc
        assert gp.pop("metadata") == (op.pop("metadata", None) or {})
        gm, om = gp.pop("measurements"), op.pop("measurements", None)
        if isinstance(om, list):
            assert gm[: len(om)] == om and gm[-1]["name"] == "WSI-LLaVA tiles"
        else:
            assert {k: v for k, v in gm.items() if not k.startswith("WSI-LLaVA")} == (om or {})
        op.setdefault("objectType", "annotation")
        assert gp == op  # every other property exactly as it was
    # run again on the output: the previous answer is kept, the new one appended
    out2 = tmp_path / "again.geojson"
    r = _invoke(
        "--slide",
        str(slide),
        "--geojson",
        str(out),
        "-o",
        str(out2),
        "--model",
        tiny_model,
        "--max-new-tokens",
        "5",
        "--question",
        "Describe this.",
        "--name",
    )
    assert r.exit_code == 0, r.output
    d2 = json.loads(out2.read_text())["features"][5]["properties"]
    assert d2["metadata"][DESCRIPTION_KEY].startswith(
        got["features"][5]["properties"]["metadata"][DESCRIPTION_KEY]
    )
    assert d2["name"] != "Second"
    # --overwrite replaces it
    r = _invoke(
        "--slide",
        str(slide),
        "--geojson",
        str(out),
        "-o",
        str(out2),
        "--model",
        tiny_model,
        "--max-new-tokens",
        "5",
        "--question",
        "Describe this.",
        "--overwrite",
    )
    d3 = json.loads(out2.read_text())["features"][0]["properties"]["metadata"][DESCRIPTION_KEY]
    assert r.exit_code == 0 and "Pathologist note." not in d3


def test_describe_command_bad_input(world, tiny_model, tmp_path):
    slide = str(world / "slides" / "slide_000.tif")
    out = tmp_path / "out.geojson"

    def run(data, *extra):
        p = tmp_path / "in.geojson"
        p.write_text(data if isinstance(data, str) else json.dumps(data))
        return _invoke(
            "--slide",
            slide,
            "--geojson",
            str(p),
            "-o",
            str(out),
            "--model",
            tiny_model,
            "--max-new-tokens",
            "5",
            "--question",
            "Describe this.",
            *extra,
        )

    r = run("{not json")
    assert r.exit_code == 1 and "not valid JSON" in r.output and not out.exists()
    r = run({"rows": [1, 2]})
    assert r.exit_code == 1 and "expected a GeoJSON FeatureCollection" in r.output
    r = run(
        {
            "type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": "EPSG:4326"}},
            "features": [
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]},
                }
            ],
        }
    )
    assert r.exit_code == 1 and "not a QuPath export" in r.output and not out.exists()
    r = run(
        {
            "type": "FeatureCollection",
            "features": [
                {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}
            ],
        }
    )
    assert r.exit_code == 1 and "no polygon annotations to describe" in r.output and not out.exists()
    far = [[[9000, 9000], [9100, 9000], [9100, 9100], [9000, 9000]]]
    near = [[[100, 100], [700, 100], [700, 700], [100, 700], [100, 100]]]

    def feat(name, c):
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": c},
            "properties": {"objectType": "annotation", "name": name},
        }

    r = run({"type": "FeatureCollection", "features": [feat("far", far)]})
    assert r.exit_code == 1 and "no annotation was described" in r.output and not out.exists()
    r = run({"type": "FeatureCollection", "features": [feat("far", far), feat("near", near)]})
    assert r.exit_code == 0 and "described 1 of 2" in r.output and "far: FAILED" in r.output
    got = json.loads(out.read_text())["features"]
    assert got[0] == feat("far", far) and description_of(got[1]["properties"])
    r = _invoke(
        "--slide", str(tmp_path / "missing.svs"), "--geojson", str(tmp_path / "in.geojson"), "-o", str(out)
    )
    assert r.exit_code == 1 and "no such file" in r.output


def test_describe_command_help_and_cli_attachment():
    r = CliRunner().invoke(describe_command, ["--help"])
    assert r.exit_code == 0 and "--overwrite" in r.output and "--question" in r.output
    assert describe_command.name == "describe"


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path):
    yield
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


# --- QuPath's own layout: NaN tokens, both measurement forms, other top-level members ------------------
def _qupath_written_text() -> str:
    """A FeatureCollection as QuPath's Gson writer emits it: bare NaN/Infinity, 0.3 and 0.4+ measurements."""
    detections = ",".join(
        json.dumps(
            {
                "type": "Feature",
                "id": f"d{i:02d}",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[20 + i, 20], [30 + i, 20], [30 + i, 30], [20 + i, 20]]],
                },
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "measurements": {"Nucleus: Area": math.nan},
                },
            },
            separators=(",", ":"),
        )
        for i in range(30)
    )
    assert '"Nucleus: Area":NaN' in detections  # the token Gson writes
    return (
        '{"type":"FeatureCollection","qupathVersion":"0.5.1","imageName":"slide_000.tif","features":['
        '{"type":"Feature","id":"7f7a0c1e-7b7e-4c55-a0a5-6a0f5e8f4b01","geometry":{"type":"Polygon",'
        '"coordinates":[[[100,100],[900,100],[900,900],[100,900],[100,100]]]},"properties":{'
        '"objectType":"annotation","classification":{"name":"Tumor","color":[200,0,0]},"name":"Tumour",'
        '"measurements":{"Area µm^2":160000.0,"Mean: Hematoxylin":NaN,"Max":Infinity}}},'
        '{"type":"Feature","id":"PathAnnotationObject","geometry":{"type":"Polygon",'
        '"coordinates":[[[1000,1000],[1600,1000],[1600,1600],[1000,1600],[1000,1000]]]},"properties":{'
        '"classification":{"name":"Stroma","colorRGB":-16711936},"isLocked":false,'
        '"measurements":[{"name":"Area","value":360000.0},{"name":"Mean","value":NaN}]}},'
        + detections
        + ',{"type":"Feature","id":"p","geometry":{"type":"Point","coordinates":[5,5]},'
        '"properties":{"objectType":"annotation"}},'
        '{"type":"Feature","id":"n","geometry":null,"properties":{"objectType":"annotation"}}]}'
    )


def test_describe_qupath_export_with_nan_loses_nothing(world, tiny_model, tmp_path, caplog):  # noqa: F811
    inp = tmp_path / "export.geojson"
    inp.write_text(_qupath_written_text(), encoding="utf-8")
    out = tmp_path / "described.geojson"
    slide = str(world / "slides" / "slide_000.tif")
    args = ["--slide", slide, "--geojson", str(inp), "-o", str(out), "--model", tiny_model]
    with caplog.at_level(logging.WARNING, logger="wsi_llava.describe"):
        r = _invoke(*args, "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    assert "described 2 of 2 annotations" in r.output
    assert [rec.getMessage() for rec in caplog.records if rec.name == "wsi_llava.describe"] == [
        f"{inp}: 32 features left unchanged, not polygon annotations (30 detection, 1 Point, 1 no geometry)"
    ]
    text = out.read_text(encoding="utf-8")
    assert '"Mean: Hematoxylin": NaN' in text and '"Max": Infinity' in text
    got, src = json.loads(text), json.loads(inp.read_text(encoding="utf-8"))
    assert [k for k in got if k != "features"] == ["type", "qupathVersion", "imageName"]
    assert got["qupathVersion"] == "0.5.1" and got["imageName"] == "slide_000.tif"
    assert len(got["features"]) == len(src["features"])
    assert json.dumps(got["features"][2:]) == json.dumps(src["features"][2:])  # NaN included
    new_form, old_form = got["features"][0]["properties"], got["features"][1]["properties"]
    assert isinstance(new_form["measurements"], dict) and new_form["measurements"]["WSI-LLaVA tiles"] >= 0
    assert isinstance(old_form["measurements"], list)  # QuPath <= 0.3 wrote a list: it stays a list
    assert old_form["measurements"][:2] == [{"name": "Area", "value": 360000.0}, old_form["measurements"][1]]
    assert math.isnan(old_form["measurements"][1]["value"])
    assert old_form["measurements"][-1]["name"] == "WSI-LLaVA tiles"
    assert description_of(new_form) and description_of(old_form)


def _one_annotation(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "id": "a1",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[100, 100], [700, 100], [700, 700], [100, 700], [100, 100]]],
                        },
                        "properties": {"objectType": "annotation", "name": "Tumour"},
                    }
                ],
            }
        )
    )
    return path


def _describe(world, model, inp: Path, out: Path):
    slide = str(world / "slides" / "slide_000.tif")
    args = ["--slide", slide, "--geojson", str(inp), "-o", str(out), "--model", model]
    return _invoke(*args, "--max-new-tokens", "5", "--question", "Describe this.")


def test_describe_in_place_through_a_link_keeps_link_and_mode(world, tiny_model, tmp_path):  # noqa: F811
    (tmp_path / "data").mkdir()
    real = _one_annotation(tmp_path / "data" / "export.geojson")
    real.chmod(0o644)
    link = tmp_path / "link.geojson"
    link.symlink_to(real)
    r = _describe(world, tiny_model, link, link)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert stat.S_IMODE(real.stat().st_mode) == 0o644
    assert description_of(json.loads(real.read_text())["features"][0]["properties"])


def test_describe_new_output_gets_the_umask_default(world, tiny_model, tmp_path):  # noqa: F811
    inp = _one_annotation(tmp_path / "in.geojson")
    old = os.umask(0o022)
    try:
        r = _describe(world, tiny_model, inp, tmp_path / "new.geojson")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "new.geojson").stat().st_mode) == 0o644


def test_describe_checks_the_output_before_any_model_work(world, tiny_model, tmp_path):  # noqa: F811
    inp = _one_annotation(tmp_path / "in.geojson")
    for out, why in [
        (tmp_path / "missing" / "out.geojson", "its folder does not exist"),
        (tmp_path, "is a folder"),
    ]:
        r = _describe(world, tiny_model, inp, out)
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert f"Error: {out}: cannot write the output GeoJSON: {why}" in r.output
        assert "nothing was described" in r.output and "Tumour" not in r.output  # no answer computed
    assert [p.name for p in tmp_path.iterdir()] == ["in.geojson"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_describe_read_only_folder_is_refused_first(world, tiny_model, tmp_path):  # noqa: F811
    inp = _one_annotation(tmp_path / "in.geojson")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = _describe(world, tiny_model, inp, ro / "out.geojson")
    finally:
        ro.chmod(0o755)
    assert r.exit_code == 1 and "cannot write the output GeoJSON" in r.output and "Tumour" not in r.output


def test_describe_failing_write_leaves_output_and_no_temp(world, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    inp = _one_annotation(tmp_path / "in.geojson")
    out = tmp_path / "out.geojson"
    out.write_text("previous result")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", disk_full)
    r = _describe(world, tiny_model, inp, out)
    monkeypatch.undo()
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{out}: cannot write GeoJSON" in r.output and "No space left" in r.output
    assert out.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.geojson", "out.geojson"]


def test_describe_deeply_nested_input_is_one_clear_error(world, tiny_model, tmp_path):  # noqa: F811
    inp = tmp_path / "deep.geojson"
    inp.write_text('{"type":"FeatureCollection","features":' + "[" * 50_000 + "]" * 50_000 + "}")
    r = _describe(world, tiny_model, inp, tmp_path / "out.geojson")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: {inp}: nested too deeply" in r.output


def test_describe_escapes_control_characters_in_labels(world, tiny_model, tmp_path):  # noqa: F811
    inp = tmp_path / "in.geojson"
    data = json.loads(_one_annotation(inp).read_text())
    data["features"][0]["properties"]["name"] = "\x1b]0;pwned\x07Tumour"
    inp.write_text(json.dumps(data))
    r = _describe(world, tiny_model, inp, tmp_path / "out.geojson")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\\x1b]0;pwned\\x07Tumour: " in r.output


# --- evidence tiles as detections in the output GeoJSON ---------------------------------------------------
def _tiles_in(features: list, box: tuple[int, int, int, int]) -> list[dict]:
    """The evidence detections among ``features`` whose centre lies in ``box`` (xmin, ymin, xmax, ymax)."""
    from wsi_llava.evidence_tiles import is_evidence_feature

    out = []
    for f in features:
        if not is_evidence_feature(f):
            continue
        ring = f["geometry"]["coordinates"][0]
        cx = (min(p[0] for p in ring) + max(p[0] for p in ring)) / 2
        cy = (min(p[1] for p in ring) + max(p[1] for p in ring)) / 2
        if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
            out.append(f)
    return out


def _relevance(feature: dict) -> float:
    ms = feature["properties"]["measurements"]
    if isinstance(ms, list):
        (value,) = [m["value"] for m in ms if m["name"] == "WSI-LLaVA relevance"]
        return value
    return ms["WSI-LLaVA relevance"]


def test_describe_evidence_writes_qupath_detections_and_replaces_them(world, tiny_model, tmp_path, caplog):  # noqa: F811
    from wsi_llava.evidence_tiles import EVIDENCE_CLASS, EVIDENCE_COLOR

    inp = tmp_path / "export.geojson"
    inp.write_text(_qupath_written_text(), encoding="utf-8")
    src = json.loads(inp.read_text(encoding="utf-8"))
    n_src = len(src["features"])
    out = tmp_path / "described.geojson"
    slide = str(world / "slides" / "slide_000.tif")
    args = ["--slide", slide, "--model", tiny_model, "--max-new-tokens", "3"]
    r = _invoke(*args, "--geojson", str(inp), "-o", str(out), "--evidence")
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text(encoding="utf-8"))
    assert [k for k in got if k != "features"] == ["type", "qupathVersion", "imageName"]
    assert json.dumps(got["features"][2:n_src]) == json.dumps(src["features"][2:])  # nothing else changed
    tiles = got["features"][n_src:]
    assert tiles and f"; {len(tiles)} evidence tile detection(s); wrote {out}" in r.output
    tumour, stroma = _tiles_in(tiles, (100, 100, 900, 900)), _tiles_in(tiles, (1000, 1000, 1600, 1600))
    assert tumour and stroma and len(tumour) + len(stroma) == len(tiles)
    for f in tiles:  # QuPath's own detection form, one child-less square per tile
        assert set(f) == {"type", "id", "geometry", "properties"} and f["type"] == "Feature"
        p = f["properties"]
        assert p["objectType"] == "detection"
        assert p["classification"] == {"name": EVIDENCE_CLASS, "color": list(EVIDENCE_COLOR)}
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        assert ring[2][0] - ring[0][0] == ring[2][1] - ring[0][1] > 0
        assert 0 < _relevance(f) <= 1
    # each annotation's tiles take its measurement form: an object, or QuPath <= 0.3's list
    assert all(isinstance(f["properties"]["measurements"], dict) for f in tumour)
    assert all(isinstance(f["properties"]["measurements"], list) for f in stroma)
    assert max(map(_relevance, tumour)) == max(map(_relevance, stroma)) == 1.0

    # describing the output again replaces the evidence instead of adding more
    again = tmp_path / "again.geojson"
    with caplog.at_level(logging.WARNING, logger="wsi_llava.describe"):
        r = _invoke(*args, "--geojson", str(out), "-o", str(again), "--evidence", "--evidence-tiles", "1")
    assert r.exit_code == 0, r.output
    assert f"replacing {len(tiles)} earlier one(s)" in r.output
    # its own tiles are not counted as left out
    assert "(30 detection, 1 Point, 1 no geometry)" in caplog.text
    d2 = json.loads(again.read_text(encoding="utf-8"))["features"]
    assert json.dumps(d2[2:n_src]) == json.dumps(src["features"][2:]) and len(d2) == n_src + 2
    assert [_relevance(f) for f in d2[n_src:]] == [1.0, 1.0]
    assert {f["id"] for f in d2[n_src:]}.isdisjoint({f["id"] for f in tiles})

    # an annotation that fails keeps its earlier evidence; without --evidence none is touched
    moved = json.loads(again.read_text(encoding="utf-8"))
    moved["features"][1]["geometry"] = {
        "type": "Polygon",
        "coordinates": [[[9000, 9000], [9100, 9000], [9100, 9100], [9000, 9000]]],
    }
    (tmp_path / "moved.geojson").write_text(json.dumps(moved), encoding="utf-8")
    third = tmp_path / "third.geojson"
    r = _invoke(*args, "--geojson", str(tmp_path / "moved.geojson"), "-o", str(third), "--evidence")
    assert r.exit_code == 0 and "described 1 of 2" in r.output, r.output
    d3 = json.loads(third.read_text(encoding="utf-8"))["features"]
    assert _tiles_in(d3, (1000, 1000, 1600, 1600)) == _tiles_in(d2, (1000, 1000, 1600, 1600))
    assert len(_tiles_in(d3, (100, 100, 900, 900))) == len(tumour)  # replaced with the default selection
    r = _invoke(*args, "--geojson", str(third), "-o", str(tmp_path / "fourth.geojson"))
    assert r.exit_code == 0, r.output
    d4 = json.loads((tmp_path / "fourth.geojson").read_text(encoding="utf-8"))["features"]
    assert d4[n_src:] == d3[n_src:]


def test_describe_evidence_options_are_checked(world, tmp_path):
    inp = _one_annotation(tmp_path / "in.geojson")
    slide = str(world / "slides" / "slide_000.tif")
    r = CliRunner().invoke(
        describe_command,
        ["--slide", slide, "--geojson", str(inp), "-o", str(tmp_path / "o.geojson"), "--evidence-tiles", "3"],
    )
    assert r.exit_code == 2 and "go with --evidence" in r.output and not (tmp_path / "o.geojson").exists()
    r = CliRunner().invoke(describe_command, ["--help"])
    assert "most relevant tiles that together hold 90 %" in " ".join(r.output.split())
