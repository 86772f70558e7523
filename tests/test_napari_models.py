"""The napari widget's models under Xvfb: user models in the box, the Add model dialog, Remove, warnings.

Real parts in their producers' layouts (a tiny Prov-GigaPath timm hub folder with ``slide_encoder.pth``
beside it, a tiny merged LLaVA-1.5 folder, the Hugging Face hub cache) are built once per module; each
test gets its own ``$WSI_LLAVA_HOME`` and hub cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui
pytest.importorskip("napari")

PLUGIN = "wsi-llava"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "artifacts" / "napari_add_model.png"
SCREENSHOT_ERROR = ROOT / "artifacts" / "napari_add_model_error.png"
REPO_ID = "prov-gigapath/prov-gigapath"
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Paper-model parts, plus a slide encoder made for 64-d tiles (the tile encoder gives 96-d)."""
    from kits.parts import make_paper_parts, make_slide_encoder_pth

    root = tmp_path_factory.mktemp("parts")
    out = make_paper_parts(root)
    out["wrong_slide_encoder"] = make_slide_encoder_pth(root / "other" / "slide_encoder.pth", in_dim=64)
    no_config = root / "gigapath-no-config"
    shutil.copytree(out["tile_encoder"], no_config)
    (no_config / "config.json").unlink()
    out["no_config"] = no_config
    return out


@pytest.fixture
def home(tmp_path, monkeypatch, parts) -> Path:
    """A fresh ``$WSI_LLAVA_HOME`` and a hub cache holding the Prov-GigaPath folder as ``REPO_ID``."""
    import huggingface_hub.constants as hf_constants
    from kits.parts import put_in_hub_cache

    home = tmp_path / "home"
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, REPO_ID, parts["tile_encoder"])
    monkeypatch.setenv("WSI_LLAVA_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return home


def _widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "WSI-LLaVA")
    return widget


def _items(widget) -> dict[str, str]:
    """The model box as the user sees it: plain name -> shown text."""
    from napari_wsi_llava._models import NAME_ROLE

    box = widget._model
    return {box.itemData(i, NAME_ROLE): box.itemText(i) for i in range(box.count())}


def _tooltip(widget, name: str) -> str:
    from qtpy.QtCore import Qt

    from napari_wsi_llava._models import NAME_ROLE

    box = widget._model
    return box.itemData(box.findData(name, NAME_ROLE), Qt.ItemDataRole.ToolTipRole)


def _fill(dialog, name="", llava="", tile_encoder="", llava_base="", slide_encoder="") -> None:
    dialog.name.setText(name)
    dialog.llava.setText(str(llava))
    dialog.llava_base.setText(str(llava_base))
    dialog.tile_encoder.setText(str(tile_encoder))
    dialog.slide_encoder.setText(str(slide_encoder))


def _press_ok_and_wait(qtbot, dialog) -> None:
    dialog.ok_button.click()
    qtbot.waitUntil(lambda: dialog.worker is None, timeout=WAIT_MS)


def _registered(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def _save_screenshot(viewer, dialog, widget, path: Path = SCREENSHOT) -> None:
    """The napari window (dock included) and the dialog side by side, as one PNG."""
    from qtpy.QtGui import QColor, QImage, QPainter
    from qtpy.QtWidgets import QApplication

    viewer.window._qt_window.resize(1400, 1000)
    QApplication.processEvents()
    assert widget.isVisible() and widget.width() > 200
    window = viewer.window._qt_window.grab().toImage()
    box = dialog.grab().toImage()
    canvas = QImage(
        window.width() + box.width() + 16, max(window.height(), box.height()), QImage.Format.Format_RGB32
    )
    canvas.fill(QColor(40, 40, 40))
    painter = QPainter(canvas)
    painter.drawImage(0, 0, window)
    painter.drawImage(window.width() + 16, 0, box)
    painter.end()
    path.parent.mkdir(exist_ok=True)
    assert canvas.save(str(path))


def test_add_model_from_a_folder_and_a_repo_id_ask_with_it_then_remove(
    make_napari_viewer, qtbot, notes, parts, home, monkeypatch, world
):
    from napari_wsi_llava import _widget as widget_module
    from wsi_llava.model.spec import ModelSpec
    from wsi_llava.registry import add_model, models_dir

    viewer = make_napari_viewer(show=True)
    widget = _widget(viewer)
    assert _items(widget)["demo"] == "demo" and widget._model.currentData() == "demo"
    assert not widget._remove_model_btn.isEnabled()  # built-in models cannot be removed

    widget._add_model_btn.click()
    dialog = widget._add_dialog
    assert dialog is not None and dialog.isVisible()
    # the LLaVA part as a folder, the tile encoder as a repo id from the hub cache, the slide encoder
    # left to its default (slide_encoder.pth beside the tile encoder's files)
    _fill(dialog, name="wsi-llava-e1", llava=parts["llava"], tile_encoder=REPO_ID)
    qtbot.waitExposed(dialog)
    qtbot.waitUntil(widget.isVisible)
    _save_screenshot(viewer, dialog, widget)
    assert SCREENSHOT.stat().st_size > 10_000

    dialog.ok_button.click()
    assert dialog.worker is not None and not dialog.ok_button.isEnabled() and not dialog.name.isEnabled()
    dialog.reject()  # Cancel does nothing while the parts are being checked
    assert dialog.isVisible()
    qtbot.waitUntil(lambda: dialog.worker is None, timeout=WAIT_MS)
    assert not dialog.isVisible(), dialog.message.text()

    folder = models_dir() / "wsi-llava-e1"
    assert folder == home / "models" / "wsi-llava-e1"
    spec = ModelSpec.load(folder)
    assert spec.llm.source == str(parts["llava"].resolve()) and spec.llm.format == "llava"
    assert spec.tile_encoder.source == f"hf://{REPO_ID}" and spec.tile_encoder.embed_dim == 96
    assert spec.slide_encoder_weights == f"hf://{REPO_ID}/slide_encoder.pth"
    assert spec.projector.in_dim == 1024
    assert _items(widget)["wsi-llava-e1"] == "wsi-llava-e1 (user)"
    assert widget._model.currentData() == "wsi-llava-e1" and widget._remove_model_btn.isEnabled()
    assert f"hf://{REPO_ID}" in _tooltip(widget, "wsi-llava-e1")
    assert any("registered model 'wsi-llava-e1'" in m and "tile encoder" in m for m in notes()), notes()

    # the registered model answers in the widget: loaded by name, parts resolved from the folder and cache
    viewer.open(world / "slides" / "slide_000.tif", plugin=PLUGIN)
    widget._question.setPlainText("What is this?")
    widget._max_tokens.setValue(4)
    widget._evidence.setChecked(False)
    widget._ask_btn.click()
    assert widget._worker is not None and not widget._add_model_btn.isEnabled()
    assert not widget._remove_model_btn.isEnabled()  # no removing the model a question is using
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert not [m for m in notes() if "rror" in m or "failed" in m], notes()
    assert len(widget.history) == 1 and widget.history[0].answer.model == "wsi-llava-e1"
    assert widget._add_model_btn.isEnabled() and widget._remove_model_btn.isEnabled()

    # a model registered elsewhere (the CLI) whose LLaVA folder then goes away: listed when the box
    # opens, marked unavailable, with the problem in its tooltip and in the status line when chosen
    moved = home.parent / "moved-llava"
    shutil.copytree(parts["llava"], moved)
    add_model("moved", llava=moved, tile_encoder=parts["tile_encoder"])
    shutil.rmtree(moved)
    widget._model.showPopup()
    widget._model.hidePopup()
    assert _items(widget)["moved"] == "moved (user, unavailable)"
    assert "no such file or folder" in _tooltip(widget, "moved") and str(moved) in _tooltip(widget, "moved")
    assert widget._model.currentData() == "wsi-llava-e1"  # refreshing keeps the choice
    widget._model.setCurrentIndex(widget._model.findData("moved"))
    assert "unavailable here" in widget._status.text() and str(moved) in widget._status.text()

    # Remove: declined, nothing happens; confirmed, the registration goes and the weights stay
    monkeypatch.setattr(widget_module, "confirm_remove", lambda parent, entry: False)
    widget._remove_model_btn.click()
    assert _registered(home) == ["moved", "wsi-llava-e1"]
    monkeypatch.setattr(widget_module, "confirm_remove", lambda parent, entry: entry.name == "moved")
    widget._remove_model_btn.click()
    assert _registered(home) == ["wsi-llava-e1"] and "moved" not in _items(widget)
    assert widget._model.currentData() == "demo"
    assert any("removed model 'moved'" in m for m in notes()), notes()
    assert parts["llava"].is_dir() and (parts["tile_encoder"] / "slide_encoder.pth").is_file()


def test_confirm_remove_asks_with_a_real_message_box(make_napari_viewer, qtbot, home):
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    from napari_wsi_llava._models import confirm_remove
    from wsi_llava.registry import ModelEntry

    viewer = make_napari_viewer()
    widget = _widget(viewer)
    entry = ModelEntry(name="x", kind="user", folder=str(home / "models" / "x"))
    seen: list[str] = []

    def press(button):
        def click():
            box = QApplication.activeModalWidget()
            seen.append(box.text())
            box.button(button).click()

        QTimer.singleShot(50, click)

    press(QMessageBox.StandardButton.No)
    assert confirm_remove(widget, entry) is False
    press(QMessageBox.StandardButton.Yes)
    assert confirm_remove(widget, entry) is True
    assert len(seen) == 2 and "'x'" in seen[0] and str(home / "models" / "x") in seen[0]


def test_bad_parts_keep_the_dialog_open_and_register_nothing(make_napari_viewer, qtbot, notes, parts, home):
    from wsi_llava.registry import add_model

    viewer = make_napari_viewer(show=True)
    widget = _widget(viewer)
    before = _items(widget)
    dialog = widget._on_add_model()

    # fields checked on the spot, named as the dialog names them; no worker starts
    _fill(dialog, name="", llava=parts["llava"], tile_encoder=parts["tile_encoder"])
    dialog.ok_button.click()
    assert dialog.worker is None and "name is empty" in dialog.message.text()
    _fill(dialog, name="bad name!", llava=parts["llava"], tile_encoder=parts["tile_encoder"])
    dialog.ok_button.click()
    assert dialog.worker is None and "model name 'bad name!'" in dialog.message.text()
    _fill(dialog, name="m", tile_encoder=parts["tile_encoder"])
    dialog.ok_button.click()
    assert dialog.worker is None and "LLaVA is empty" in dialog.message.text()
    nowhere = home.parent / "nowhere"
    _fill(dialog, name="m", llava=parts["llava"], tile_encoder=nowhere)
    dialog.ok_button.click()
    assert dialog.worker is None and f"tile encoder {str(nowhere)!r}: no such file" in dialog.message.text()

    # parts checked in the worker: a tile-encoder folder without config.json
    _fill(dialog, name="m", llava=parts["llava"], tile_encoder=parts["no_config"])
    _press_ok_and_wait(qtbot, dialog)
    assert dialog.isVisible() and "config.json" in dialog.message.text()
    assert str(parts["no_config"]) in dialog.message.text()
    assert dialog.ok_button.isEnabled() and dialog.name.isEnabled()  # the user can fix it and retry

    # a repo id that is not in the local hub cache: nothing is downloaded
    _fill(dialog, name="m", llava=parts["llava"], tile_encoder="someone/not-cached")
    _press_ok_and_wait(qtbot, dialog)
    assert "'someone/not-cached': not in the local Hugging Face cache" in dialog.message.text()

    # widths that do not fit: a slide encoder made for 64-d tiles behind a 96-d tile encoder
    _fill(
        dialog,
        name="m",
        llava=parts["llava"],
        tile_encoder=parts["tile_encoder"],
        slide_encoder=parts["wrong_slide_encoder"],
    )
    _press_ok_and_wait(qtbot, dialog)
    text = dialog.message.text()
    assert dialog.isVisible() and "parts do not fit" in text and "96-d" in text and "64-d" in text
    _save_screenshot(viewer, dialog, widget, SCREENSHOT_ERROR)
    for message in ("config.json", "not in the local Hugging Face cache", "parts do not fit"):
        assert any(message in m for m in notes()), (message, notes())
    assert _registered(home) == [] and _items(widget) == before

    # a name already registered: named, with the way out; the registered model is untouched
    add_model("taken", llava=parts["llava"], tile_encoder=parts["tile_encoder"])
    spec_file = home / "models" / "taken" / "wsi_llava.json"
    spec_before = spec_file.read_text()
    _fill(dialog, name="taken", llava=parts["llava"], tile_encoder=parts["no_config"])
    dialog.ok_button.click()
    assert dialog.worker is None and "'taken' is already registered" in dialog.message.text()
    dialog.overwrite.setChecked(True)  # replacing it with a broken part still writes nothing
    _press_ok_and_wait(qtbot, dialog)
    assert "config.json" in dialog.message.text() and spec_file.read_text() == spec_before

    dialog.buttons.button(dialog.buttons.StandardButton.Cancel).click()
    assert not dialog.isVisible() and _registered(home) == ["taken"]
    assert json.loads(spec_before)["name"] == "taken"


def test_answer_warnings_show_in_the_answer_box_history_and_once_as_a_notification(
    make_napari_viewer, notes, home
):
    from napari_wsi_llava._jobs import Job
    from wsi_llava.answer import Answer

    viewer = make_napari_viewer()
    widget = _widget(viewer)
    ood = "the slide's tiles lie outside the demo model's synthetic training world"
    notice = "demo model: not a diagnostic model"
    widget._jobs = [Job("What is this?"), Job("And this?")]
    first = Answer(
        question="What is this?",
        answer="Tumour.",
        scope="slide",
        model="demo",
        demo=True,
        notice=notice,
        warnings=[ood],
    )
    widget._on_event(("answer", 0, first, (2048, 2048)))
    widget._on_event(("answer", 1, first.model_copy(update={"question": "And this?"}), (2048, 2048)))
    box = widget._answer.toPlainText()
    assert f"⚠ {ood}" in box and f"({notice})" in box
    assert widget._warnings.isVisibleTo(widget) and ood in widget._warnings.text()
    assert len(widget.history) == 2
    entry, item = widget.history[0], widget._history.item(0)
    assert f"⚠ {ood}" in entry.text and f"({notice})" in entry.text and item.text() == entry.text
    assert not item.icon().isNull() and item.toolTip() == ood
    assert sum(ood in m for m in notes()) == 1  # one notification per run, however many answers share it

    # an answer without warnings: the warning line goes; selecting the earlier one brings it back
    clean = Answer(question="Q", answer="Normal.", scope="slide", model="demo")
    widget._jobs = [Job("Q")]
    widget._on_event(("answer", 0, clean, (2048, 2048)))
    assert not widget._warnings.isVisibleTo(widget) and widget._history.item(2).icon().isNull()
    assert "⚠" not in widget.history[2].text
    widget._history.setCurrentRow(0)
    assert widget._warnings.isVisibleTo(widget) and ood in widget._warnings.text()
