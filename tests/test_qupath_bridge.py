"""The QuPath bridge against a Java test double of QuPath's py4j entry point, through real qubalab calls.

The double (qupath_ext/testdouble/FakeQuPath.java) is compiled with javac against the jar the py4j
package ships and started on a free port; ``wsi-llava qupath status | describe | ask`` run against it
and the double's stored objects are inspected afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from kits.qupath import FakeQuPath, free_port

from wsi_llava import hookimpl, plugins
from wsi_llava.annotate import DESCRIPTION_KEY
from wsi_llava_qupath.bridge import connect, uri_to_path
from wsi_llava_qupath.commands import qupath
from wsi_llava_qupath.sink import WHOLE_SLIDE_NAME, qupath_sink

pytestmark = pytest.mark.bridge

BOX = [[[100, 100], [700, 100], [700, 700], [100, 700], [100, 100]]]


def _feature(name, coords=None, gtype="Polygon", **props):
    return {
        "type": "Feature",
        "geometry": {"type": gtype, "coordinates": coords if coords is not None else BOX},
        "properties": {"objectType": "annotation", "name": name, **props},
    }


@pytest.fixture(scope="module")
def world_png(world, tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic slide and its level 0 as a PNG (the pixels the double serves)."""
    from PIL import Image

    from wsi_llava.slide import open_slide

    slide = world / "slides" / "slide_000.tif"
    png = tmp_path_factory.mktemp("qupath_png") / "slide_000.png"
    with open_slide(slide) as r:
        Image.fromarray(r.read_region((0, 0), 0, r.dimensions)).save(png)
    return slide, png


def _run(fq: FakeQuPath, *args: str):
    result = CliRunner().invoke(qupath, [*args, "--port", str(fq.port)], catch_exceptions=False)
    return result


def _by_name(fq: FakeQuPath) -> dict[str, dict]:
    return {f["properties"].get("name"): f for f in fq.objects()}


def test_status(fake_qupath, world_png):
    fq = fake_qupath
    r = _run(fq, "status")
    assert r.exit_code == 0, r.output
    assert "connected to QuPath" in r.output and "0.0-testdouble" in r.output
    assert "image: none open" in r.output

    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    fq.add_object(_feature("a"), selected=True)
    fq.add_object(_feature("b"), selected=False)
    fq.add_object({**_feature("det"), "properties": {"objectType": "detection"}}, selected=True)
    r = _run(fq, "status")
    assert r.exit_code == 0, r.output
    assert "2048 x 2048 px, 0.5 µm/px" in r.output and str(slide) in r.output
    assert "annotations: 2, selected: 1" in r.output


def test_describe_selected_writes_back(fake_qupath, world_png, tiny_model):
    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    kept_props = {
        "classification": {"names": ["Tumor", "Positive"], "color": [200, 0, 0]},
        "color": [10, 20, 30],
        "metadata": {DESCRIPTION_KEY: "Reviewed by Dr A."},
        "measurements": {"Area µm^2": 12.5},
    }
    fq.add_object(_feature("has description", **kept_props), selected=True)
    fq.add_object(
        _feature("plain", coords=[[[900, 900], [1500, 900], [1500, 1500], [900, 1500], [900, 900]]]),
        selected=True,
    )
    fq.add_object(_feature("not selected"), selected=False)
    fq.add_object(_feature("a point", coords=[50, 50], gtype="Point"), selected=True)
    fq.add_object(
        _feature("outside", coords=[[[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]]), selected=True
    )
    before = _by_name(fq)

    r = _run(fq, "describe", "--selected", "--name", "--model", tiny_model, "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert "answered 2 annotation(s)" in r.output and "1 failed" in r.output
    assert "outside: FAILED" in r.output and "lie outside the slide" in r.output

    objs = fq.objects()
    by_id = {f["id"]: f for f in objs}
    old = {f["id"]: f for f in before.values()}
    changed = [f for f in objs if f != old[f["id"]]]
    assert len(changed) == 2  # the point, the unselected and the outside one are untouched
    for f in changed:
        p = f["properties"]
        desc = p["metadata"][DESCRIPTION_KEY]
        assert p["measurements"]["WSI-LLaVA tiles"] > 0
        assert p["name"] and p["name"] not in ("has description", "plain")  # short name from the answer
        was = old[f["id"]]["properties"]
        if "classification" in was:
            assert desc.startswith("Reviewed by Dr A.\n\n--- WSI-LLaVA, ")
            assert "Describe the tissue in this region." in desc.splitlines()[2]
            assert p["classification"] == was["classification"] and p["color"] == was["color"]
            assert p["measurements"]["Area µm^2"] == 12.5
        else:
            assert "---" not in desc and desc.strip()
        assert by_id[f["id"]]["geometry"] == old[f["id"]]["geometry"]
    assert fq.ep.testHierarchyUpdates() >= 1

    # --overwrite replaces the description instead of appending
    # ... and --all takes every area annotation, selected or not
    r = _run(
        fq,
        "ask",
        "Is there necrosis?",
        "--all",
        "--model",
        tiny_model,
        "--max-new-tokens",
        "3",
        "--overwrite",
    )
    assert r.exit_code == 0, r.output
    assert "answered 3 annotation(s)" in r.output and "1 failed" in r.output
    for f in fq.objects():
        if f["id"] in {c["id"] for c in changed}:
            assert "Reviewed by Dr A." not in f["properties"]["metadata"][DESCRIPTION_KEY]
    assert _by_name(fq)["not selected"]["properties"]["metadata"][DESCRIPTION_KEY].strip()


def test_ask_whole_slide_through_qupath_pixels(fake_qupath, world_png, tiny_model, tmp_path):
    """The file is not reachable here: pixels come from QuPath's server (PNG over the gateway)."""
    fq = fake_qupath
    _, png = world_png
    fq.open_image("file:/nowhere/on/this/machine/slide_000.tif", png, 2048, 2048, 0.5)
    fq.add_object(_feature("existing", metadata={DESCRIPTION_KEY: "keep me"}), selected=False)
    before = fq.objects()
    r = _run(
        fq,
        "ask",
        "Summarise this slide.",
        "--whole-slide",
        "--model",
        tiny_model,
        "--max-new-tokens",
        "4",
        "--cache",
        str(tmp_path),
    )
    assert r.exit_code == 0, r.output
    objs = fq.objects()
    assert objs[0] == before[0]  # the existing annotation is untouched
    new = [f for f in objs if f["properties"].get("name") == WHOLE_SLIDE_NAME]
    assert len(new) == 1
    assert new[0]["properties"]["metadata"][DESCRIPTION_KEY].strip()
    assert new[0]["properties"]["objectType"] == "annotation"
    assert new[0]["geometry"]["coordinates"][0][2] == [2048, 2048]
    assert list(tmp_path.glob("qupath/*.qupath-image"))  # the session read QuPath's pixels


def test_qupath_reader_pixels_match_the_file(fake_qupath, world_png, tmp_path):
    from wsi_llava.slide import open_slide
    from wsi_llava_qupath.reader import write_pointer

    fq = fake_qupath
    slide, png = world_png
    fq.open_image("file:/nowhere/slide_000.tif", png, 2048, 2048, 0.5)
    bridge = connect(fq.port)
    pointer = write_pointer(bridge, tmp_path)
    with open_slide(pointer) as qr, open_slide(slide) as fr:
        assert qr.reader_name == "qupath" and qr.dimensions == (2048, 2048) and qr.mpp == 0.5
        a = qr.read_region((300, 400), 0, (256, 200))
        b = fr.read_region((300, 400), 0, (256, 200))
        assert np.array_equal(a, b)
        edge = qr.read_region((2000, 2000), 0, (100, 100))  # partly outside: white there
        assert np.array_equal(edge[:48, :48], fr.read_region((2000, 2000), 0, (48, 48)))
        assert (edge[60:, 60:] == 255).all()
        low = qr.read_region((0, 0), 1, (512, 512))
        ref = np.asarray(fr.thumbnail(512), dtype=float)
        assert np.abs(low.astype(float) - ref).mean() < 12
    bridge.close()


def test_bad_input(fake_qupath, world_png, fake_qupath_build, tiny_model):
    fq = fake_qupath
    # nothing listens on the port
    r = CliRunner().invoke(qupath, ["status", "--port", str(free_port())])
    assert r.exit_code == 1 and "cannot connect to QuPath on port" in r.output and "Traceback" not in r.output
    # no image open
    r = _run(fq, "describe", "--model", tiny_model)
    assert r.exit_code == 1 and "no image is open in QuPath" in r.output
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    # nothing selected (an unselected annotation, a selected detection)
    fq.add_object(_feature("unselected"), selected=False)
    fq.add_object({**_feature("det"), "properties": {"objectType": "detection"}}, selected=True)
    r = _run(fq, "describe", "--model", tiny_model)
    assert r.exit_code == 1 and "nothing selected in QuPath" in r.output
    # only points selected: skipped with a message, nothing to do
    fq.add_object(_feature("pt", coords=[5, 5], gtype="Point"), selected=True)
    r = _run(fq, "ask", "What is here?", "--model", tiny_model)
    assert r.exit_code == 1 and "nothing selected" in r.output
    # every selected annotation outside the image: non-zero, nothing changed
    fq.add_object(
        _feature("far", coords=[[[9000, 9000], [9100, 9000], [9100, 9100], [9000, 9000]]]), selected=True
    )
    before = fq.objects()
    r = _run(fq, "describe", "--model", tiny_model, "--max-new-tokens", "4")
    assert r.exit_code == 1 and "no annotation was answered" in r.output
    assert fq.objects() == before and fq.ep.testHierarchyUpdates() == 0
    # empty question
    r = _run(fq, "ask", "  ")
    assert r.exit_code == 1 and "question is empty" in r.output


def test_wrong_token(fake_qupath_build):
    fq = FakeQuPath(fake_qupath_build[0], token="s3cret")
    try:
        r = CliRunner().invoke(qupath, ["status", "--port", str(fq.port), "--token", "wrong"])
        assert r.exit_code == 1 and "with this token" in r.output
        r = CliRunner().invoke(qupath, ["status", "--port", str(fq.port), "--token", "s3cret"])
        assert r.exit_code == 0 and "connected to QuPath" in r.output
    finally:
        fq.close()


def test_sink(fake_qupath, world_png):
    from wsi_llava.answer import Answer

    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    fq.add_object(_feature("s"), selected=True)
    bridge = connect(fq.port)
    ann = bridge.annotations(selected=True)[0]
    answer = Answer(question="How many mitoses?", answer="12", scope="region", model="m")
    qupath_sink(answer, {})  # not asked from QuPath: ignored
    assert DESCRIPTION_KEY not in json.dumps(fq.objects())
    qupath_sink(answer, {"qupath_bridge": bridge, "qupath_annotation": ann})
    props = fq.objects()[0]["properties"]
    assert props["metadata"][DESCRIPTION_KEY] == "12"
    assert props["measurements"]["WSI-LLaVA answer"] == 12.0
    assert props["name"] == "s" and fq.ep.testHierarchyUpdates() == 1
    bridge.close()


def test_describe_and_ask_with_a_registered_user_model(fake_qupath, world_png, tmp_path, monkeypatch):
    """A model registered with ``wsi-llava models add`` (Prov-GigaPath + merged LLaVA layouts) is named in
    ``wsi-llava qupath describe|ask --model NAME``; an unknown name lists the registered ones."""
    from kits.parts import make_paper_parts

    from wsi_llava import registry

    monkeypatch.setenv("WSI_LLAVA_HOME", str(tmp_path / "home"))
    parts = make_paper_parts(tmp_path / "parts")
    registry.add_model("gp-llava", llava=parts["llava"], tile_encoder=parts["tile_encoder"])
    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    fq.add_object(_feature("sel"), selected=True)
    cache = ["--cache", str(tmp_path / "cache"), "--device", "cpu"]
    r = _run(fq, "describe", "--selected", "--model", "gp-llava", "--max-new-tokens", "3", *cache)
    assert r.exit_code == 0, r.output
    assert "answered 1 annotation(s)" in r.output
    desc = _by_name(fq)["sel"]["properties"]["metadata"][DESCRIPTION_KEY]
    assert desc.strip() and "demo" not in desc.lower()
    r = _run(fq, "ask", "Summarise this slide.", "--whole-slide", "--model", "gp-llava", "--max-new-tokens", "3",
             *cache)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _by_name(fq)[WHOLE_SLIDE_NAME]["properties"]["metadata"][DESCRIPTION_KEY].strip()
    r = _run(fq, "describe", "--selected", "--model", "gp-lava", *cache)
    assert (
        r.exit_code == 1
        and "gp-llava" in r.output
        and "models add" in r.output
        and "Traceback" not in r.output
    )


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("file:/C:/My%20slides/case%201.svs", "C:/My slides/case 1.svs"),  # java.io.File.toURI()
        ("file:///C:/My%20slides/case%201.svs", "C:/My slides/case 1.svs"),
        ("file:/d:/x.ndpi", "d:/x.ndpi"),
        ("file:///C|/old/form.svs", "C:/old/form.svs"),
        ("file://server/share/a%20b.svs", "//server/share/a b.svs"),  # a UNC share
        ("file:/data/my%20slides/a.svs", "/data/my slides/a.svs"),
        ("file:///data/a.svs", "/data/a.svs"),
        ("file://localhost/data/a%23b.svs", "/data/a#b.svs"),
        ("https://example.org/slides/a.svs", None),
        ("omero://host/image/1", None),
    ],
)
def test_uri_to_path(uri, path):
    assert uri_to_path(uri) == path


def test_a_slide_path_with_spaces_is_read_from_its_file(fake_qupath, world_png, tmp_path):  # noqa: F811
    slide, png = world_png
    spaced = tmp_path / "my slides" / "case #1 (H&E).tif"
    spaced.parent.mkdir()
    spaced.symlink_to(slide)
    fake_qupath.open_image(spaced.as_uri(), png, 2048, 2048, 0.5)
    bridge = connect(fake_qupath.port)
    try:
        info = bridge.image_info()
    finally:
        bridge.close()
    assert "%20" in info.uris[0] and info.local_path == spaced


def test_measurements_go_back_in_the_form_they_were_read(fake_qupath, world_png, tiny_model):  # noqa: F811
    """QuPath <= 0.3 objects (measurements a list of {name, value}, ``getMeasurementList()``) and later
    ones (an object, ``getMeasurements()``) in one run: each keeps its form and its measurements."""
    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    fq.add_object(_feature("new", measurements={"Area": 5.5}), selected=True)
    fq.add_object(_feature("old", measurements=[{"name": "Area", "value": 5.5}]), selected=True)
    fq.add_object(_feature("old, none yet", measurements=[]), selected=True)  # exported without any
    r = _run(fq, "describe", "--model", tiny_model, "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert "answered 3 annotation(s)" in r.output
    objs = _by_name(fq)
    new = objs["new"]["properties"]["measurements"]
    assert isinstance(new, dict) and new["Area"] == 5.5 and new["WSI-LLaVA tiles"] > 0
    old = objs["old"]["properties"]["measurements"]
    assert [m["name"] for m in old] == ["Area", "WSI-LLaVA tiles"] and old[0]["value"] == 5.5
    assert old[1]["value"] == new["WSI-LLaVA tiles"]
    none_yet = objs["old, none yet"]["properties"]["measurements"]
    assert [m["name"] for m in none_yet] == ["WSI-LLaVA tiles"]
    assert all(o["properties"]["metadata"][DESCRIPTION_KEY].strip() for o in objs.values())


class _SinkRecorder:
    """A third-party plugin with two result sinks: one records, one always fails."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    @hookimpl
    def register_sinks(self, register):
        register("test-recorder", self.record)
        register("test-broken", self.broken)

    def record(self, answer, context) -> None:
        self.seen.append((answer, context))

    def broken(self, answer, context) -> None:
        raise RuntimeError("the lab database is down")


def test_describe_and_ask_hand_every_answer_to_the_result_sinks(fake_qupath, world_png, tiny_model):  # noqa: F811
    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    fq.add_object(_feature("a"), selected=True)
    fq.add_object(
        _feature("b", coords=[[[900, 900], [1500, 900], [1500, 1500], [900, 1500], [900, 900]]]),
        selected=True,
    )
    recorder = _SinkRecorder()
    plugins.register_plugin(recorder, name="test-sink-recorder")
    try:
        r = _run(fq, "describe", "--model", tiny_model, "--max-new-tokens", "4")
        assert r.exit_code == 0, r.output
        assert "answered 2 annotation(s)" in r.output  # the failing sink loses nothing
        assert r.output.count("result sink 'test-broken'") == 2 and "the lab database is down" in r.output
        assert [c["qupath_annotation"].label for _, c in recorder.seen] == ["a", "b"]
        assert all(c["frontend"] == "qupath" and c["qupath_bridge"] is not None for _, c in recorder.seen)
        written = {n: f["properties"]["metadata"][DESCRIPTION_KEY] for n, f in _by_name(fq).items()}
        for answer, context in recorder.seen:  # the QuPath sink wrote the very answers the others saw
            assert written[context["qupath_annotation"].label].startswith(answer.answer)
        assert fq.ep.testHierarchyUpdates() == 1  # one redraw after the last region

        r = _run(
            fq,
            "ask",
            "Summarise this slide.",
            "--whole-slide",
            "--model",
            tiny_model,
            "--max-new-tokens",
            "4",
        )
        assert r.exit_code == 0, r.output
        answer, context = recorder.seen[-1]
        assert len(recorder.seen) == 3 and answer.scope == "slide" and context["qupath_annotation"] is None
        whole = _by_name(fq)[WHOLE_SLIDE_NAME]["properties"]
        assert whole["metadata"][DESCRIPTION_KEY].startswith(answer.answer)
    finally:
        plugins.unregister_plugin("test-sink-recorder")


# --- evidence tiles as QuPath detections ------------------------------------------------------------------
def _evidence_of(fq: FakeQuPath, parent_id: str | None) -> list[dict]:
    from wsi_llava.evidence_tiles import EVIDENCE_CLASS

    return [
        d
        for d in fq.detections()
        if d["parent"] == parent_id
        and d["properties"].get("classification", {}).get("name") == EVIDENCE_CLASS
    ]


def _check_tiles(tiles: list[dict], box: tuple[int, int, int, int] | None = None) -> None:
    """Square detections with one relevance measurement in (0, 1], the top one 1; centres inside ``box``."""
    from wsi_llava.evidence_tiles import EVIDENCE_CLASS, RELEVANCE_MEASUREMENT

    assert tiles
    values = []
    for t in tiles:
        p = t["properties"]
        assert p["objectType"] == "detection" and p["classification"]["name"] == EVIDENCE_CLASS
        ring = np.asarray(t["geometry"]["coordinates"][0])
        x0, y0 = ring.min(axis=0)
        x1, y1 = ring.max(axis=0)
        assert t["geometry"]["type"] == "Polygon" and len(ring) == 5 and x1 - x0 == y1 - y0 > 0
        if box is not None:
            assert box[0] <= (x0 + x1) / 2 <= box[2] and box[1] <= (y0 + y1) / 2 <= box[3]
        ms = p["measurements"]
        value = (
            ms[RELEVANCE_MEASUREMENT]
            if isinstance(ms, dict)
            else dict((m["name"], m["value"]) for m in ms)[RELEVANCE_MEASUREMENT]
        )
        assert 0 < value <= 1
        values.append(value)
    assert max(values) == 1.0


def _n_tiles_said(output: str, label: str) -> int:
    import re

    m = re.search(rf"^{re.escape(label)}: .*\[(\d+) evidence tiles\]$", output, re.M)
    assert m, output
    return int(m.group(1))


def test_ask_evidence_adds_tile_detections_below_the_annotation(fake_qupath, world_png, tiny_model):
    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    a = fq.add_object(_feature("a"), selected=True)
    b = fq.add_object(
        _feature("b", coords=[[[900, 900], [1500, 900], [1500, 1500], [900, 1500], [900, 900]]]),
        selected=False,
    )
    own = fq.add_child(
        a,
        {
            **_feature("a cell"),
            "properties": {"objectType": "detection", "classification": {"name": "Tumor"}},
        },
    )
    other = fq.add_child(b, {**_feature("b tile"), "properties": {"objectType": "detection",
                             "classification": {"name": "WSI-LLaVA evidence"}}})  # fmt: skip
    ask = ["ask", "Is there necrosis?", "--model", tiny_model, "--max-new-tokens", "3"]
    r = _run(fq, *ask)
    assert r.exit_code == 0, r.output
    assert _evidence_of(fq, a) == [] and "evidence tiles" not in r.output  # none unless asked

    r = _run(fq, *ask, "--evidence")
    assert r.exit_code == 0, r.output
    first = _evidence_of(fq, a)
    assert len(first) == _n_tiles_said(r.output, "a") > 0
    _check_tiles(first, (100, 100, 700, 700))
    assert fq.ep.testHierarchyUpdates() >= 1

    # asking again replaces this annotation's evidence; other objects stay
    r = _run(fq, *ask, "--evidence", "--evidence-tiles", "2")
    assert r.exit_code == 0, r.output
    second = _evidence_of(fq, a)
    assert len(second) == _n_tiles_said(r.output, "a") == min(2, len(first))  # greedy: the same answer
    assert not {t["id"] for t in first} & {t["id"] for t in second}
    ids = {d["id"]: d["parent"] for d in fq.detections()}
    assert ids[own] == a and ids[other] == b  # the user's detection and b's evidence are untouched
    assert len(ids) == 2 + len(second)

    # a tiny mass keeps the top tile only; the annotation's description and measurements are written as ever
    r = _run(fq, *ask, "--evidence", "--evidence-mass", "0.000001")
    assert r.exit_code == 0, r.output
    assert [t["properties"]["measurements"]["WSI-LLaVA relevance"] for t in _evidence_of(fq, a)] == [1.0]
    assert _by_name(fq)["a"]["properties"]["metadata"][DESCRIPTION_KEY].strip()

    # describe --evidence too; a QuPath <= 0.3 annotation gets its evidence measurements as a list
    fq.add_object(_feature("old", measurements=[{"name": "Area", "value": 1.0}]), selected=True)
    r = _run(fq, "describe", "--all", "--evidence", "--model", tiny_model, "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    old_id = _by_name(fq)["old"]["id"]
    legacy = _evidence_of(fq, old_id)
    assert legacy and all(isinstance(t["properties"]["measurements"], list) for t in legacy)
    _check_tiles(legacy, (100, 100, 700, 700))
    assert len(_evidence_of(fq, b)) == _n_tiles_said(r.output, "b")  # b's earlier evidence replaced
    assert other not in {d["id"] for d in fq.detections()}


def test_ask_whole_slide_evidence_replaces_the_earlier_whole_slide_evidence(
    fake_qupath, world_png, tiny_model
):
    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    ask = ["ask", "Summarise this slide.", "--whole-slide", "--evidence", "--model", tiny_model]
    r = _run(fq, *ask, "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    (first,) = [f for f in fq.objects() if f["properties"].get("name") == WHOLE_SLIDE_NAME]
    tiles = _evidence_of(fq, first["id"])
    assert r.output.strip().endswith(f"[{len(tiles)} evidence tiles]")
    _check_tiles(tiles, (0, 0, 2048, 2048))
    r = _run(fq, *ask, "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    whole = [f for f in fq.objects() if f["properties"].get("name") == WHOLE_SLIDE_NAME]
    assert len(whole) == 2 and whole[0]["id"] == first["id"]
    assert _evidence_of(fq, first["id"]) == []
    assert len(fq.detections()) == len(_evidence_of(fq, whole[1]["id"])) > 0


def test_evidence_options_need_evidence(fake_qupath):
    r = CliRunner().invoke(qupath, ["ask", "Q?", "--evidence-tiles", "5", "--port", str(fake_qupath.port)])
    assert r.exit_code == 2 and "--evidence-tiles and --evidence-mass go with --evidence" in r.output
    r = CliRunner().invoke(qupath, ["describe", "--evidence", "--evidence-mass", "1.5"])
    assert r.exit_code == 2 and "--evidence-mass" in r.output
    r = CliRunner().invoke(qupath, ["ask", "--help"])
    text = " ".join(r.output.split())
    assert "hold 90 % of the answer's relevance, at most 300" in text and "relevant tile = 1" in text


class _StallingProxy:
    """A TCP proxy in front of the test double that forwards py4j's commands until one calls ``method``,
    then holds that one and every later one unanswered: QuPath stuck (a dialog opened) in mid-write."""

    def __init__(self, target_port: int, method: str) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.method = f"\n{method}\n".encode()
        self.stalled = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        try:
            while True:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                self.sockets += [client, upstream]
                for src, dst, commands in ((client, upstream, True), (upstream, client, False)):
                    threading.Thread(target=self._pipe, args=(src, dst, commands), daemon=True).start()
        except OSError:  # closed
            pass

    def _pipe(self, src, dst, commands: bool) -> None:
        try:
            while data := src.recv(65536):
                if commands and (self.stalled.is_set() or self.method in data):
                    self.stalled.set()  # read, never forwarded, never answered
                    continue
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            s.close()


@pytest.mark.parametrize("scope", ["region", "slide"])
def test_a_qupath_stalling_while_adding_the_evidence_leaves_no_answer_without_its_tiles(
    fake_qupath, world_png, scope
):
    """QuPath stops answering once the evidence tiles are being added: the answer's description is not in
    QuPath (the annotation keeps its own; a new whole-slide annotation has none), and the sink says so."""
    from wsi_llava.answer import Answer, Evidence
    from wsi_llava.evidence_tiles import EvidenceSelection
    from wsi_llava_qupath.bridge import QuPathError

    fq = fake_qupath
    slide, png = world_png
    fq.open_image(slide.as_uri(), png, 2048, 2048, 0.5)
    fq.add_object(_feature("a", metadata={DESCRIPTION_KEY: "Reviewed."}), selected=True)
    proxy = _StallingProxy(fq.port, "addObjectBelowParent")
    bridge = connect(proxy.port, call_timeout=1.0)
    try:
        annotation = bridge.annotations(selected=True)[0] if scope == "region" else None
        evidence = Evidence(
            tile_indices=[0, 1], coords=[(100, 100), (356, 100)], scores=[0.6, 0.4], tile_size=256
        )
        answer = Answer(question="Q?", answer="Tumour.", scope=scope, model="m", evidence=evidence)
        context = {"qupath_bridge": bridge, "qupath_annotation": annotation, "evidence": EvidenceSelection()}
        with pytest.raises(QuPathError, match="did not answer"):
            qupath_sink(answer, context)
        assert proxy.stalled.is_set()
    finally:
        bridge.close()
        proxy.close()
    described = {
        f["properties"].get("name"): f["properties"].get("metadata", {}).get(DESCRIPTION_KEY)
        for f in fq.objects()
    }
    assert described.pop("a") == "Reviewed."
    assert all(not d for d in described.values()), described  # a whole-slide annotation at most, bare
    assert fq.detections() == []
