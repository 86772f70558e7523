"""The napari plugin under Xvfb: reader, sample, dock widget asking a drawn region, cancel, GeoJSON, errors.

The demo model (SmolLM2) is loaded by each test that asks (a widget keeps its models until it closes);
answers are short (a few tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui
pytest.importorskip("napari")

PLUGIN = "wsi-llava"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "artifacts" / "napari_screenshot.png"
WAIT_MS = 300_000


def _widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "WSI-LLaVA")
    return widget


def _wait_idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not widget._top.loading, timeout=WAIT_MS)  # the top evidence thumbnails


def test_reader_opens_slides_lazily_in_microns(make_napari_viewer, world, cmu_svs):
    import dask.array as da

    from wsi_llava.slide import open_slide

    viewer = make_napari_viewer()
    slide = world / "slides" / "slide_000.tif"
    (layer,) = viewer.open(slide, plugin=PLUGIN)
    reader = open_slide(slide)
    assert layer.multiscale and layer.rgb
    assert len(layer.data) == len(reader.level_dimensions)
    for level, (w, h) in zip(layer.data, reader.level_dimensions, strict=True):
        assert isinstance(level, da.Array) and level.shape == (h, w, 3) and level.dtype == np.uint8
    np.testing.assert_allclose(layer.scale, (reader.mpp, reader.mpp))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    np.testing.assert_array_equal(
        np.asarray(layer.data[1][100:164, 200:296]), reader.read_region((400, 200), 1, (96, 64))
    )

    # an OpenSlide-only read path (Aperio SVS): chunks call read_region, nothing read up front
    (svs,) = viewer.open(cmu_svs, plugin=PLUGIN)
    real = open_slide(cmu_svs)
    assert svs.metadata["wsi_llava"]["reader"] == real.reader_name
    w, h = real.level_dimensions[0]
    assert svs.data[0].shape[:2] == (h, w) if svs.multiscale else svs.data.shape[:2] == (h, w)
    level0 = svs.data[0] if svs.multiscale else svs.data
    np.testing.assert_array_equal(
        np.asarray(level0[1000:1050, 1030:1100]), real.read_region((1030, 1000), 0, (70, 50))
    )
    np.testing.assert_allclose(svs.scale, (real.mpp, real.mpp))

    # QuPath GeoJSON opens as Shapes over the slide, names and classes kept
    (shapes,) = viewer.open(world / "annotations" / "slide_000.geojson", plugin=PLUGIN)
    assert shapes.__class__.__name__ == "Shapes" and len(shapes.data) > 0
    assert all(shapes.features["name"] != "") and "source" in shapes.features


def test_bad_files_and_bad_input_notify(make_napari_viewer, tmp_path, notes, world):
    import tifffile

    viewer = make_napari_viewer()
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"this is not a TIFF file" * 10)
    assert viewer.open(bad, plugin=PLUGIN) == []
    assert any("broken.tif" in m for m in notes()), notes()
    bad_json = tmp_path / "broken.geojson"
    bad_json.write_text('{"type": "FeatureCollection", "features": [', encoding="utf-8")
    assert viewer.open(bad_json, plugin=PLUGIN) == []
    assert any("broken.geojson" in m and "not valid JSON" in m for m in notes()), notes()

    # a slide without µm/px: opens in pixels with a warning; asking names the missing µm/px
    plain = tmp_path / "no_mpp.tif"
    tifffile.imwrite(plain, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    (image,) = viewer.open(plain, plugin=PLUGIN)
    assert tuple(image.scale) == (1.0, 1.0) and any("no_mpp.tif" in m and "µm/px" in m for m in notes())
    widget = _widget(viewer)
    widget._question.setPlainText("What is this?")
    widget._ask_btn.click()
    assert widget._worker is None and any("records no microns per pixel" in m for m in notes())
    assert any("enter the slide's true µm/px in the WSI-LLaVA widget" in m for m in notes())

    # empty question, no selection, a shape outside the slide, no model: notifications, nothing lost
    widget._mpp.setValue(0.5)
    widget._question.setPlainText("   ")
    widget._ask_btn.click()
    assert any("question is empty" in m for m in notes())
    layer = widget._on_new_regions_layer()
    layer.add_rectangles(np.array([[5000.0, 5000.0], [5400.0, 5600.0]]))
    layer.features.loc[0, "answer"] = "kept"
    widget._question.setPlainText("What is this?")
    widget._scope.setCurrentText("selected shapes")
    widget._ask_btn.click()
    assert any("no shape is selected" in m for m in notes())
    layer.selected_data = {0}
    widget._ask_btn.click()
    assert any("lie outside the slide" in m for m in notes())
    widget._model.clear()
    widget._ask_btn.click()
    assert any("no model is registered" in m for m in notes())
    assert widget._worker is None and len(layer.data) == 1 and layer.features.loc[0, "answer"] == "kept"


def test_implausible_mpp_is_named_as_read_not_as_missing(make_napari_viewer, tmp_path, notes):
    """A 72-dpi TIFF in centimetres reads as 352.8 µm/px: the reader and the widget say what was read and
    that it is implausible (the core's words), never that the slide records none."""
    import tifffile

    screen = tmp_path / "screen.tif"
    res = 72 / 2.54
    tifffile.imwrite(
        screen, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
        resolution=(res, res), resolutionunit="CENTIMETER",
    )  # fmt: skip
    viewer = make_napari_viewer()
    (image,) = viewer.open(screen, plugin=PLUGIN)
    read = "352.8 µm/px read from the TIFF XResolution/ResolutionUnit tags (28.3465 px per centimetre)"
    plausible = "is outside the 0.05–50 µm/px of a slide scan (wrong metadata?)"
    assert tuple(image.scale) == (1.0, 1.0)
    opened = [m for m in notes() if "screen.tif" in m]
    assert any(read in m and plausible in m and "scale bar shows pixels" in m for m in opened), opened
    widget = _widget(viewer)
    widget._question.setPlainText("What is this?")
    widget._ask_btn.click()
    asked = [m for m in notes() if "enter the slide's true µm/px in the WSI-LLaVA widget" in m]
    assert widget._worker is None and asked and read in asked[-1] and plausible in asked[-1], notes()
    assert not any("records no" in m for m in notes()), notes()


def test_sample_ask_region_streams_answer_history_evidence(make_napari_viewer, qtbot, notes, tmp_path):
    from qtpy.QtWidgets import QApplication

    from napari_wsi_llava._evidence import LAYER_NAME
    from wsi_llava.slide.geojson import read_geojson

    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "demo_slide")
    image = next(
        lyr for lyr in viewer.layers if "wsi_llava" in lyr.metadata and lyr.__class__.__name__ == "Image"
    )
    truth = viewer.layers["demo regions"]
    widget = _widget(viewer)
    assert "demo" in [widget._model.itemText(i) for i in range(widget._model.count())]
    assert widget._image_combo.currentText() == image.name

    # draw a rectangle (level-0 px are the regions layer's data coordinates) around a ground-truth region
    regions = widget._on_new_regions_layer()
    names = list(truth.features["name"])
    tumour = truth.data[next(i for i, n in enumerate(names) if n.startswith("Tumor"))]
    (y0, x0), (y1, x1) = tumour.min(axis=0), tumour.max(axis=0)
    w, h = image.metadata["wsi_llava"]["dimensions"]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    regions.add_rectangles(np.array([[y0, x0], [y1, x1]]))
    regions.selected_data = {0}
    widget._scope.setCurrentText("selected shapes")
    widget._preset.setCurrentText("describe")
    widget._max_tokens.setValue(6)
    tokens: list[str] = []
    widget._ask_btn.click()
    assert widget._worker is not None and not widget._ask_btn.isEnabled()
    widget._worker.yielded.connect(lambda e: tokens.append(e[2]) if e[0] == "token" else None)
    _wait_idle(qtbot, widget)

    assert not [m for m in notes() if "rror" in m or "failed" in m], notes()
    assert len(widget.history) == 1
    answer = widget.history[0].answer
    assert answer.scope == "region" and answer.question == widget._question.toPlainText()
    assert answer.answer and "".join(tokens).strip() == answer.answer
    row = regions.features.iloc[0]
    assert (
        row["answer"] == answer.answer and row["question"] == answer.question and row["model"] == answer.model
    )
    assert answer.answer[:10] in row["label"] and regions.text.string.format == "{label}"
    assert answer.answer in widget.history[0].text and answer.answer in widget._answer.toPlainText()
    widget._history.setCurrentRow(0)
    widget._on_copy()
    assert QApplication.clipboard().text() == widget.history[0].text
    # the region asked is the rectangle drawn, in level-0 pixels
    np.testing.assert_allclose(answer.region.bounds, (x0, y0, x1, y1))

    # evidence: a heat map over the slide, aligned with it (same extent, cell of the top tile = 1)
    assert LAYER_NAME in viewer.layers
    ev = viewer.layers[LAYER_NAME]
    tile_world = answer.evidence.tile_size * image.scale[-1]
    # napari extents run between pixel centres: widen by half a pixel to compare covered areas
    img_lo = np.asarray(image.extent.world[0][-2:]) - np.asarray(image.scale[-2:]) / 2
    img_hi = np.asarray(image.extent.world[1][-2:]) + np.asarray(image.scale[-2:]) / 2
    ev_lo = np.asarray(ev.extent.world[0]) - np.asarray(ev.scale) / 2
    ev_hi = np.asarray(ev.extent.world[1]) + np.asarray(ev.scale) / 2
    np.testing.assert_allclose(ev_lo, img_lo, atol=1e-6)
    assert ((ev_hi - img_hi) >= -1e-6).all() and ((ev_hi - img_hi) < tile_world).all()
    top = int(np.argmax(answer.evidence.scores))
    cx, cy = np.asarray(answer.evidence.coords[top]) + answer.evidence.tile_size / 2
    cell = np.round(ev.world_to_data((cy * image.scale[-2], cx * image.scale[-1]))).astype(int)
    assert ev.data[cell[0], cell[1]] == pytest.approx(1.0)
    # top evidence of a region answer: its most relevant tiles, every one inside the region
    listed = widget._top.tiles
    assert 0 < len(listed) <= 8 and widget._top.count() == len(listed)
    # the level-0 tile centres the core selects by (``center_data`` is napari's, half a pixel before)
    centres = np.array([(t.xy[0] + t.tile / 2, t.xy[1] + t.tile / 2) for t in listed])
    assert answer.region.contains(centres[:, 0], centres[:, 1]).all()
    by_xy = dict(zip(map(tuple, answer.evidence.coords), answer.evidence.scores, strict=True))
    assert [t.score for t in listed] == sorted((by_xy[t.xy] for t in listed), reverse=True)
    assert [t.score for t in listed] == sorted(answer.evidence.scores, reverse=True)[: len(listed)]
    viewer.reset_view()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    viewer.window.screenshot(path=str(SCREENSHOT), canvas_only=False, flash=False)
    assert SCREENSHOT.stat().st_size > 10_000
    widget._opacity.setValue(30)
    assert ev.opacity == pytest.approx(0.3)

    # describe: the generated text becomes the shape's description; an existing one is kept
    widget._evidence.setChecked(False)
    widget._max_tokens.setValue(4)
    widget._describe_btn.click()
    _wait_idle(qtbot, widget)
    assert len(widget.history) == 2
    description = widget.history[1].answer.answer
    assert regions.features.iloc[0]["description"] == description
    assert regions.features.iloc[0]["answer"] == answer.answer
    widget._describe_btn.click()
    assert widget._worker is None and any("already has a description" in m for m in notes())

    # export through the writer contribution: QuPath GeoJSON with the answer and description
    out = tmp_path / "answered.geojson"
    viewer.layers.selection = {regions}
    viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    feature = json.loads(out.read_text(encoding="utf-8"))["features"][0]
    meta = feature["properties"]["metadata"]
    assert feature["properties"]["objectType"] == "annotation"
    assert meta["ANNOTATION_DESCRIPTION"] == description and meta["wsi_llava.answer"] == answer.answer
    (back,) = read_geojson(out)
    assert back.bounds == answer.region.bounds


def test_cancel_mid_extraction_leaves_no_cache(
    make_napari_viewer, qtbot, notes, world, monkeypatch, tmp_path
):
    import time
    import uuid

    import wsi_llava.slide.tiling as tiling
    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.settings import cache_dir

    real = tiling.iter_tile_batches

    def slow_batches(*args, **kwargs):  # small, slow batches so Cancel lands mid-extraction
        kwargs["batch_size"] = 1
        for batch in real(*args, **kwargs):
            time.sleep(0.3)
            yield batch

    monkeypatch.setattr(tiling, "iter_tile_batches", slow_batches)
    features = cache_dir() / "features"
    before = {e.path for e in FeatureCache(features).list()} if features.exists() else set()
    # a copy with unique trailing bytes: a new slide fingerprint, so no other test has cached its features
    slide = tmp_path / "cancel_me.tif"
    slide.write_bytes((world / "slides" / "slide_001.tif").read_bytes() + uuid.uuid4().bytes)
    viewer = make_napari_viewer()
    viewer.open(slide, plugin=PLUGIN)
    widget = _widget(viewer)
    widget._question.setPlainText("Which tissue types are present?")
    widget._ask_btn.click()
    qtbot.waitUntil(lambda: widget._pbar is not None, timeout=WAIT_MS)
    widget._cancel_btn.click()
    _wait_idle(qtbot, widget)
    assert widget.history == [] and widget._ask_btn.isEnabled()
    assert widget._status.text() == "cancelled"
    qtbot.waitUntil(lambda: not list(features.glob(".*.tmp-*")), timeout=30_000)  # the temp group is removed
    after = {e.path for e in FeatureCache(features).list()}
    assert after == before  # nothing that looks complete was written for the cancelled slide

    monkeypatch.undo()
    with widget._sessions.using(slide, "demo", None) as session:
        feats = session.extract()
        assert feats.n_tiles == len(session.grid.coords) and np.isfinite(feats.features).all()


def test_geojson_round_trip_keeps_geometry_and_properties(make_napari_viewer, tmp_path, world):
    from wsi_llava.slide.geojson import read_geojson

    data = json.loads((world / "annotations" / "slide_000.geojson").read_text(encoding="utf-8"))
    extra = [
        {
            "type": "Feature",
            "id": "with-hole",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[100.5, 100.25], [400, 100], [400, 380], [100, 400], [100.5, 100.25]],
                    [[200, 200], [300, 200], [300, 300], [200, 200]],
                ],
            },
            "properties": {
                "objectType": "annotation",
                "name": "ring",
                "color": [10, 20, 30],
                "isLocked": True,
                "measurements": {"Area": 1234.5, "Score": "NaN"},
                "metadata": {"ANNOTATION_DESCRIPTION": "existing description", "lab": "A"},
            },
        },
        {
            "type": "Feature",
            "id": "multi",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[0, 0], [10, 0], [10, 10], [0, 0]]],
                    [[[500, 500], [700, 500], [700, 650], [500, 650], [500, 500]]],
                ],
            },
            "properties": {"objectType": "annotation", "classification": {"names": ["Tumor", "Positive"]}},
        },
    ]
    data["features"].extend(extra)
    src = tmp_path / "qupath.geojson"
    src.write_text(json.dumps(data), encoding="utf-8")
    original = read_geojson(src)

    viewer = make_napari_viewer()
    (layer,) = viewer.open(src, plugin=PLUGIN)
    names = list(layer.features["name"])
    assert (
        "ring" in names and layer.features.loc[names.index("ring"), "description"] == "existing description"
    )
    out = tmp_path / "exported.geojson"
    viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    exported = read_geojson(out)
    assert len(exported) == len(original)
    for a, b in zip(original, exported, strict=True):
        np.testing.assert_allclose(a.points, b.points, atol=1e-9)
        assert a.holes == b.holes and a.id == b.id and a.name == b.name
        assert a.properties == b.properties
    raw_in, raw_out = data["features"], json.loads(out.read_text(encoding="utf-8"))["features"]
    assert [f["geometry"] for f in raw_out] == [
        {"type": f["geometry"]["type"], "coordinates": f["geometry"]["coordinates"]} for f in raw_in
    ]

    # import the export again: the same shapes and features
    (again,) = viewer.open(out, plugin=PLUGIN)
    assert len(again.data) == len(layer.data)
    for a, b in zip(layer.data, again.data, strict=True):
        np.testing.assert_allclose(a, b)
    cols = ["name", "description", "question", "answer", "model", "label"]
    assert again.features[cols].equals(layer.features[cols])


def test_the_evidence_layer_is_neither_a_slide_nor_the_frame_of_imported_shapes(make_napari_viewer, world):
    """The heat map carries ``wsi_llava`` metadata too, at a tile's scale: shapes opened after an answer
    still land on the slide, and the slide box lists slides only."""
    from napari_wsi_llava._evidence import LAYER_NAME
    from wsi_llava.answer import Answer, Evidence

    viewer = make_napari_viewer()
    (image,) = viewer.open(world / "slides" / "slide_000.tif", plugin=PLUGIN)
    widget = _widget(viewer)
    evidence = Evidence(tile_indices=[0, 1], coords=[(0, 0), (256, 0)], scores=[0.25, 0.75], tile_size=256)
    answer = Answer(question="Q", answer="A", scope="slide", model="demo", evidence=evidence)
    widget._show_evidence(answer, tuple(image.metadata["wsi_llava"]["dimensions"]), image)
    heat = viewer.layers[LAYER_NAME]
    assert list(viewer.layers).index(heat) > list(viewer.layers).index(image)  # above the slide
    (shapes,) = viewer.open(world / "annotations" / "slide_000.geojson", plugin=PLUGIN)
    assert [widget._image_combo.itemText(i) for i in range(widget._image_combo.count())] == [image.name]
    np.testing.assert_allclose(shapes.scale, image.scale)


def test_top_evidence_lists_the_slide_tiles_goes_there_and_follows_history(make_napari_viewer, qtbot, notes):
    """The dock's top evidence of a whole-slide answer: 8 tiles in descending relevance, thumbnails that
    are the slide's pixels there, a click centring the canvas on the tile; emptied by an answer without
    evidence and back when the first answer's history row is selected."""
    from qtpy.QtCore import Qt

    from napari_wsi_llava._evidence import LAYER_NAME
    from napari_wsi_llava._top_evidence import THUMB, TILES_ACROSS
    from wsi_llava.answer import Answer, Evidence
    from wsi_llava.slide import open_slide

    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "demo_slide")
    image = viewer.layers[0]
    widget = _widget(viewer)
    top = widget._top
    widget._question.setPlainText("Is there tumour on this slide?")
    widget._max_tokens.setValue(4)
    widget._ask_btn.click()
    _wait_idle(qtbot, widget)
    assert not [m for m in notes() if "rror" in m or "failed" in m], notes()
    ev = widget.history[0].answer.evidence
    scores = np.asarray(ev.scores)
    assert (scores > 0).sum() >= 8

    # the 8 highest scores, in descending order, each labelled with its rank and relevance
    order = np.argsort(-scores, kind="stable")[:8]
    assert top.count() == 8 and [t.xy for t in top.tiles] == [tuple(ev.coords[i]) for i in order]
    assert [t.score for t in top.tiles] == pytest.approx(scores[order].tolist())
    for row, t in enumerate(top.tiles):
        rank, percent = top.item(row).text().split(" · ")
        assert int(rank) == row + 1 and float(percent.rstrip(" %")) == pytest.approx(100 * t.score, abs=0.05)

    # thumbnails: the slide's own pixels at each tile (the demo's 256-px tiles are 64 px at level 2)
    with open_slide(image.metadata["wsi_llava"]["path"]) as reader:
        level = list(reader.level_downsamples).index(ev.tile_size / THUMB)
        for t in top.tiles:
            expected = reader.read_region(t.xy, level, (THUMB, THUMB))
            np.testing.assert_array_equal(top.thumbnails[t.rank], expected)
    # the item's icon shows it (the display's colour depth may round each channel a little)
    shown = top.item(0).icon().pixmap(THUMB, THUMB).toImage().pixelColor(THUMB // 2, THUMB // 3)
    rgb = np.array([shown.red(), shown.green(), shown.blue()])
    np.testing.assert_allclose(rgb, top.thumbnails[1][THUMB // 3, THUMB // 2], atol=8)

    # a click centres the canvas on the tile (its heat-map cell) and zooms to a few tiles across
    viewer.reset_view()
    camera = viewer.scene.camera
    zoom_before = camera.zoom
    t = top.tiles[2]
    qtbot.mouseClick(top.viewport(), Qt.MouseButton.LeftButton, pos=top.visualItemRect(top.item(2)).center())
    heat = viewer.layers[LAYER_NAME]
    cell = (t.xy[1] // ev.tile_size, t.xy[0] // ev.tile_size)
    assert heat.data[cell] == pytest.approx(t.score / scores.max(), rel=1e-5)
    np.testing.assert_allclose(camera.center[-2:], np.asarray(heat.data_to_world(cell))[-2:], atol=1e-6)
    corner = np.asarray(image.data_to_world((t.xy[1] - 0.5, t.xy[0] - 0.5)))[-2:]
    np.testing.assert_allclose(camera.center[-2:], corner + np.asarray(heat.scale) / 2, atol=1e-6)
    tile_on_screen = camera.zoom * ev.tile_size * image.scale[-1]
    assert camera.zoom > 2 * zoom_before
    assert tile_on_screen == pytest.approx(min(viewer.canvas.size) / TILES_ACROSS, rel=1e-6)

    # an answer without evidence empties the list (and the map); its history row the same
    widget._evidence.setChecked(False)
    widget._ask_btn.click()
    _wait_idle(qtbot, widget)
    assert len(widget.history) == 2 and widget.history[1].answer.evidence.coords == []
    assert top.count() == 0 and top.tiles == [] and not heat.data.any()
    # selecting the first answer's row shows its tiles again, the second's empties them
    widget._history.setCurrentRow(0)
    qtbot.waitUntil(lambda: not top.loading, timeout=WAIT_MS)
    assert [t.xy for t in top.tiles] == [tuple(ev.coords[i]) for i in order] and len(top.thumbnails) == 8
    assert heat.data.max() == pytest.approx(1.0)
    widget._history.setCurrentRow(1)
    assert top.count() == 0
    # precomputed visual tokens carry no tile positions: nothing to list
    widget._history.setCurrentRow(0)
    tokens = Answer(question="Q", answer="A", scope="slide", model="demo", evidence=Evidence(method="none"))
    widget._show_evidence(tokens, tuple(image.metadata["wsi_llava"]["dimensions"]), image)
    assert top.count() == 0 and not top.loading


def test_screenshot_script_saves_the_canvas_and_the_dock_of_a_region_answer(world, tmp_path):
    """``scripts/napari_screenshot.py`` end to end in its own napari: two PNGs, the region's top tiles logged."""
    import re
    import subprocess
    import sys

    from PIL import Image

    canvas, dock = tmp_path / "canvas.png", tmp_path / "dock.png"
    x, y, w, h = 256, 512, 1024, 768
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "napari_screenshot.py"), str(world / "slides" / "slide_000.tif"),
         "--canvas", str(canvas), "--dock", str(dock), "--region", f"{x},{y},{w},{h}", "--max-tokens", "2",
         "--size", "900", "700"],
        capture_output=True, text=True, timeout=WAIT_MS / 1000,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    listed = [
        tuple(map(int, m)) for m in re.findall(r"top evidence .* at level-0 \((\d+), (\d+)\)", out.stderr)
    ]
    assert 1 <= len(listed) <= 8, out.stderr
    tile = 256  # the world's 0.5 µm/px: 256 level-0 px per tile
    assert all(x <= tx + tile / 2 <= x + w and y <= ty + tile / 2 <= y + h for tx, ty in listed), listed
    shot, panel = np.asarray(Image.open(canvas)), np.asarray(Image.open(dock))
    assert shot.ndim == 3 and min(shot.shape[:2]) > 200 and shot[..., :3].std() > 10  # a picture, not a blank
    assert panel.ndim == 3 and panel.shape[0] > panel.shape[1] > 150
