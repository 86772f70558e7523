"""The napari dock's "Run on: server" mode against a real ``wsi-llava serve`` process (pytest-qt, Xvfb).

Test connection names each failure in a notification (refused, name not resolved, timeout, TLS, 401, 403,
an API version of its own) and lists the server's models on success; Ask streams the server's answer into
the dock with its evidence heat map, for a whole slide and a drawn region; a slide the server cannot see
is uploaded once and asked about.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from kits.listeners import canned_http, closed_port, silent_listener, tls_listener

pytestmark = pytest.mark.gui
pytest.importorskip("napari")

PLUGIN = "wsi-llava"
WAIT_MS = 180_000


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    from kits.serve import running_server

    tmp = tmp_path_factory.mktemp("serve_napari")
    with running_server(tmp, [world / "slides" / "slide_000.tif"], token=True) as server:
        yield server, tmp / "token"


def _widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "WSI-LLaVA")
    widget._run_on.setCurrentText("server")
    return widget


def _check(qtbot, widget, notes, url: str, token_file: str = "") -> str:
    """Press Test connection; the notification it ends with."""
    start = len(notes())
    widget._server_url.setText(url)
    widget._token_file.setText(token_file)
    widget._test_btn.click()
    qtbot.waitUntil(lambda: widget._check_worker is None and len(notes()) > start, timeout=WAIT_MS)
    return notes()[-1]


def test_test_connection_names_the_failure_and_lists_models(
    make_napari_viewer, qtbot, notes, served, tmp_path
):
    from napari_wsi_llava._models import NAME_ROLE

    server, token_file = served
    viewer = make_napari_viewer()
    widget = _widget(viewer)
    assert widget._test_btn.isVisibleTo(widget) and not widget._add_model_btn.isVisibleTo(widget)
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    port = closed_port()
    assert "connection refused" in _check(qtbot, widget, notes, f"http://127.0.0.1:{port}")
    assert "does not resolve" in _check(qtbot, widget, notes, "http://no-such-host.invalid:8765")
    with tls_listener(tmp_path) as url:
        assert "TLS certificate is not trusted" in _check(qtbot, widget, notes, url)
    with canned_http(200, {"status": "ok", "version": "99", "api": "v2", "models": ["x"], "workers": 1,
                           "auth": False, "queue": {"capacity": 1}}) as url:  # fmt: skip
        assert "speaks API v2" in _check(qtbot, widget, notes, url)
    with silent_listener() as port:
        assert "took longer than" in _check(qtbot, widget, notes, f"http://127.0.0.1:{port}")
    assert "401 unauthorized" in _check(qtbot, widget, notes, server.url)
    assert "403 forbidden" in _check(qtbot, widget, notes, server.url, str(wrong))

    ok = _check(qtbot, widget, notes, server.url, str(token_file))
    assert ok.startswith("WSI-LLaVA: connected to") and "models: demo" in ok, ok
    names = [widget._model.itemData(i, NAME_ROLE) for i in range(widget._model.count())]
    assert names == server.health()["models"]
    assert widget._model.itemText(0).endswith("(default)")
    widget._run_on.setCurrentText("this computer")  # back to the local registry
    assert widget._add_model_btn.isVisibleTo(widget) and not widget._test_btn.isVisibleTo(widget)
    assert "demo" in [widget._model.itemData(i, NAME_ROLE) for i in range(widget._model.count())]


def test_ask_on_the_server_streams_and_shows_evidence(
    make_napari_viewer, qtbot, notes, served, world, tmp_path
):
    from napari_wsi_llava._evidence import LAYER_NAME

    server, token_file = served
    viewer = make_napari_viewer()
    (image,) = viewer.open(server.root / "slide_000.tif", plugin=PLUGIN)
    widget = _widget(viewer)
    assert _check(qtbot, widget, notes, server.url, str(token_file)).startswith("WSI-LLaVA: connected")
    widget._question.setPlainText("Is there tumour on this slide?")
    widget._max_tokens.setValue(3)
    tokens: list[str] = []
    widget._ask_btn.click()
    assert widget._worker is not None
    widget._worker.yielded.connect(lambda e: tokens.append(e[2]) if e[0] == "token" else None)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert not [m for m in notes() if "rror" in m or "failed" in m], notes()
    (entry,) = widget.history
    answer = entry.answer
    assert answer.scope == "slide" and answer.answer and "".join(tokens).strip() == answer.answer
    assert answer.slide == image.metadata["wsi_llava"]["path"]  # the local slide, as a local answer names it
    assert answer.answer in widget._answer.toPlainText()
    assert LAYER_NAME in viewer.layers and answer.evidence.scores
    heat = np.asarray(viewer.layers[LAYER_NAME].data)
    assert heat.max() > 0

    # a drawn region: the server answers about that rectangle, in level-0 px
    regions = widget._on_new_regions_layer()
    regions.add_rectangles(np.array([[256.0, 384.0], [1024.0, 1280.0]]))
    regions.selected_data = {0}
    widget._scope.setCurrentText("selected shapes")
    widget._evidence.setChecked(False)
    widget._ask_btn.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    answer = widget.history[-1].answer
    assert answer.scope == "region" and regions.features.iloc[0]["answer"] == answer.answer
    np.testing.assert_allclose(answer.region.bounds, (384, 256, 1280, 1024))

    # a slide outside the server's root: 403 for its path, so it is uploaded once and asked about
    other = tmp_path / "mine.tif"
    shutil.copyfile(world / "slides" / "slide_001.tif", other)
    (mine,) = viewer.open(other, plugin=PLUGIN)
    widget._image_combo.setCurrentText(mine.name)
    widget._scope.setCurrentText("whole slide")
    widget._ask_btn.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert any("uploaded the slide to the server" in m for m in notes()), notes()
    assert widget.history[-1].answer.slide == str(other.resolve()) and len(widget.history) == 3
    assert widget._uploads.get(server.url, str(other)).startswith("upload:")
