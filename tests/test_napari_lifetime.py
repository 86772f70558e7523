"""The napari plugin lets go of what it opens, and leaves ``torch.compile`` working for other plugins.

Slide files stay open while a layer shows them, sessions while their slide layer exists, models while a
widget that used them is open. Open files are counted in ``/proc/self/fd``, so nothing here depends on
which reader backs a slide. The tiny random model of the QuPath tests answers (milliseconds a token).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd"),
]
pytest.importorskip("napari")

PLUGIN = "wsi-llava"
WAIT_MS = 300_000
ROOT = Path(__file__).resolve().parents[1]


def open_files(path: Path) -> int:
    """How many file descriptors of this process are open on ``path``."""
    target = str(path.resolve())
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            n += os.readlink(f"/proc/self/fd/{fd}") == target
    return n


@pytest.fixture
def slide(world, tmp_path) -> Path:
    """A copy of a synthetic slide that only this test opens."""
    dst = tmp_path / "mine.tif"
    shutil.copyfile(world / "slides" / "slide_000.tif", dst)
    return dst


def _widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "WSI-LLaVA")
    return widget


def _ask_whole_slide(qtbot, widget, model: str) -> None:
    from napari_wsi_llava._models import NAME_ROLE

    widget._model.setCurrentIndex(widget._model.findData(model, NAME_ROLE))
    widget._scope.setCurrentText("whole slide")
    widget._question.setPlainText("What tissue is shown?")
    widget._evidence.setChecked(False)
    widget._max_tokens.setValue(2)
    before = len(widget.history)
    widget._ask_btn.click()
    assert widget._worker is not None
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert len(widget.history) == before + 1, widget._status.text()


def test_removing_the_slide_layer_closes_its_file_and_sessions_closing_the_widget_frees_the_model(
    make_napari_viewer,
    qtbot,
    slide,
    tiny_model,  # noqa: F811
):
    from napari_wsi_llava import _jobs

    viewer = make_napari_viewer()
    (layer,) = viewer.open(slide, plugin=PLUGIN)
    by_layer = open_files(slide)
    assert by_layer >= 1
    widget = _widget(viewer)
    _ask_whole_slide(qtbot, widget, tiny_model)
    assert widget._sessions.slides() == {str(slide.resolve())}
    assert open_files(slide) > by_layer and tiny_model in _jobs._models  # the session opened it again

    viewer.layers.remove(layer)
    assert widget._sessions.slides() == set()
    assert open_files(slide) == 0  # the layer's reader and the session's are both closed

    # open it again: a new session answers, and only the widget's end lets go of the model
    viewer.open(slide, plugin=PLUGIN)
    _ask_whole_slide(qtbot, widget, tiny_model)
    assert widget._sessions.slides() == {str(slide.resolve())} and open_files(slide) > by_layer
    viewer.window.remove_dock_widget(widget)  # the dock's ✕
    assert widget._sessions.closed and widget._sessions.slides() == set()
    assert open_files(slide) == by_layer and tiny_model not in _jobs._models
    viewer.layers.clear()
    assert open_files(slide) == 0


def test_a_duplicated_layer_keeps_the_file_open_until_the_last_one_goes(make_napari_viewer, slide):
    from napari.layers import Layer

    viewer = make_napari_viewer()
    (layer,) = viewer.open(slide, plugin=PLUGIN)
    twin = viewer.add_layer(Layer.create(*layer.as_layer_data_tuple()))
    viewer.layers.remove(layer)
    assert open_files(slide) >= 1
    np.asarray(twin.data[-1][:8, :8])  # still readable
    viewer.layers.remove(twin)
    assert open_files(slide) == 0


def test_removing_the_layer_mid_question_cancels_it_and_closes_the_session_after(
    make_napari_viewer,
    qtbot,
    slide,
    tiny_model,  # noqa: F811
    monkeypatch,
):
    import time

    import wsi_llava.slide.tiling as tiling

    real = tiling.iter_tile_batches

    def slow_batches(*args, **kwargs):  # small, slow batches: the layer goes while the session reads tiles
        kwargs["batch_size"] = 1
        for batch in real(*args, **kwargs):
            time.sleep(0.2)
            yield batch

    monkeypatch.setattr(tiling, "iter_tile_batches", slow_batches)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(slide, plugin=PLUGIN)
    widget = _widget(viewer)
    from napari_wsi_llava._models import NAME_ROLE

    widget._model.setCurrentIndex(widget._model.findData(tiny_model, NAME_ROLE))
    widget._scope.setCurrentText("whole slide")
    widget._question.setPlainText("What tissue is shown?")
    widget._ask_btn.click()
    qtbot.waitUntil(lambda: widget._pbar is not None, timeout=WAIT_MS)
    viewer.layers.remove(layer)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert widget.history == [] and widget._status.text() == "cancelled"
    assert widget._sessions.slides() == set() and open_files(slide) == 0


def test_closing_the_viewer_closes_every_slide_file_it_opened(
    make_napari_viewer,
    slide,
    cmu_svs,
    tmp_path,
    tiny_model,  # noqa: F811
):
    from napari_wsi_llava import _reader

    svs = tmp_path / "mine.svs"
    shutil.copyfile(cmu_svs, svs)
    gc.collect()  # what earlier tests left behind is not this test's to report
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        viewer = make_napari_viewer()
        viewer.open(slide, plugin=PLUGIN)
        viewer.open(svs, plugin=PLUGIN)  # through OpenSlide, which holds no descriptor between reads
        viewer.open_sample(PLUGIN, "demo_slide")
        infos = [lyr.metadata.get("wsi_llava") or {} for lyr in viewer.layers]
        handles = {info.get("handle") for info in infos} - {None}
        paths = {info["path"] for info in infos if "path" in info}
        widget = _widget(viewer)
        with widget._sessions.using(slide, tiny_model, None) as session:
            assert session.reader.dimensions == (2048, 2048)
        assert open_files(slide) >= 2
        viewer.close()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(paths) == 3 and [m for m in unclosed if any(p in m for p in paths)] == []
    assert open_files(slide) == 0
    assert len(handles) == 3 and not handles & set(_reader._open_slides)  # the SVS and the demo slide too
    assert widget._sessions.closed and widget._sessions.slides() == set()  # the widget went with the viewer


TRITON_AFTER_GL = """
import sys
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)  # the canvas starts OpenGL: Mesa maps its libLLVM
QApplication.processEvents()
with open("/proc/self/maps") as maps:
    print("Mesa's LLVM before the widget:", any("libLLVM" in line for line in maps), flush=True)
viewer.window.add_plugin_dock_widget("wsi-llava", "WSI-LLaVA")
import torch._dynamo  # what torch.compile imports; it loads triton when installed
from torch.utils._triton import has_triton_package

print("triton usable:", has_triton_package(), sys.modules.get("triton") is not None, flush=True)
viewer.close()
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_torch_compile_still_finds_triton_after_the_widget_opens(tmp_path):
    """In a fresh process: the canvas's OpenGL comes first, then the widget; triton stays importable.

    Without care, ``import triton`` after Mesa's OpenGL driver segfaults; blocking triton for the whole
    process instead breaks ``torch.compile`` for every other plugin.
    """
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X display with OpenGL (pytest-xvfb starts Xvfb when it is installed)")
    script = tmp_path / "triton_after_gl.py"
    script.write_text(textwrap.dedent(TRITON_AFTER_GL), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}  # the test display, with OpenGL
    env["PYTHONFAULTHANDLER"] = "1"
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "triton usable: True True" in done.stdout, done.stdout + done.stderr[-4000:]
