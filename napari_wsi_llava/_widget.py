"""The WSI-LLaVA dock widget: ask about the slide or drawn regions, stream the answer, show evidence.

Thin by design: every action turns the viewer's state into one core call (``SlideSession`` through
:mod:`napari_wsi_llava._jobs`) run in a napari thread worker; results come back through the core's
result sinks (the napari sink writes them onto the shapes), the history list and the evidence layer.
Bad input becomes a napari notification; nothing already drawn or answered is touched.

The widget's sessions close with the image layer they answer about; closing the widget (its dock's ✕, or
the viewer) cancels a running question and frees its sessions and the models only it used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from napari_wsi_llava._evidence import LAYER_NAME, evidence_heatmap, evidence_layer_kwargs
from napari_wsi_llava._evidence_list import TopEvidenceList
from napari_wsi_llava._jobs import Job, SessionPool, ask_events, forget_model
from napari_wsi_llava._models import (
    ENTRY_ROLE,
    NAME_ROLE,
    AddModelDialog,
    ModelBox,
    confirm_remove,
    fill_model_box,
    fill_server_models,
    report_message,
)
from napari_wsi_llava._reader import slide_info, watch_viewer
from napari_wsi_llava._server import (
    LOCAL,
    SERVER,
    ServerSettings,
    UploadMemo,
    check_connection,
    connected_message,
    server_ask_events,
)
from napari_wsi_llava._shapes import (
    META_KEY,
    image_transform_meta,
    layer_kwargs,
    layer_to_regions,
    normalise_features,
)
from napari_wsi_llava._sink import ensure_registered
from napari_wsi_llava._triton import preload_triton
from wsi_llava.answer import Answer
from wsi_llava.errors import Cancelled, RegionError, WsiLlavaError
from wsi_llava.progress import CancelToken

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

SCOPES = ("whole slide", "selected shapes", "every shape")
PRESETS = {
    "describe": "Describe the tissue in this region.",
    "diagnosis": "What is the most likely diagnosis?",
    "grade": "What is the histological grade of the tumour?",
    "tissue types": "Which tissue types are present?",
    "tumour?": "Is there tumour in this region?",
    "necrosis?": "Is there necrosis?",
}
DESCRIBE_QUESTION = PRESETS["describe"]
REGIONS_LAYER = "WSI-LLaVA regions"


@dataclass
class HistoryEntry:
    """One answered question as the history list shows it."""

    answer: Answer
    scope: str
    when: str

    @property
    def text(self) -> str:
        a = self.answer
        lines = [
            f"[{self.when}] {self.scope} · {a.model}",
            f"Q: {a.question}",
            f"A: {a.answer or '(no text)'}",
        ]
        lines += answer_notes(a)
        return "\n".join(lines)


def answer_notes(answer: Answer) -> list[str]:
    """The lines shown under an answer: its notice (e.g. the demo label) and every warning."""
    notes = [f"({answer.notice})"] if answer.notice else []
    return notes + [f"⚠ {w}" for w in answer.warnings]


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _show_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def _show_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


class WsiLlavaWidget(QWidget):
    """Dock widget: scope, model (add / remove user models), question (presets), Ask / Describe / Cancel,
    answer with its warnings and top evidence tiles, history, evidence."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.history: list[HistoryEntry] = []
        self._worker: Any = None
        self._cancel: CancelToken | None = None
        self._pbar: Any = None
        self._jobs: list[Job] = []
        self._job_layer: Any = None
        self._job_image: Any = None
        self._run_warnings: set[str] = set()
        self._add_dialog: AddModelDialog | None = None
        self._sessions = SessionPool()
        self._uploads = UploadMemo()
        self._server_models: str | None = None  # the URL whose models the model box lists
        self._check_worker: Any = None
        self._docked = False
        preload_triton()  # before any torch work: torch.compile imports triton, unsafe once OpenGL is up
        ensure_registered()
        watch_viewer(viewer)
        self._build()
        self._refresh_layers()
        self._refresh_models()
        self._layer_events = (
            (viewer.layers.events.inserted, self._refresh_layers),
            (viewer.layers.events.removed, self._refresh_layers),
            (viewer.layers.events.removed, self._on_layer_removed),
            (viewer.layers.events.reordered, self._refresh_layers),
        )
        for emitter, callback in self._layer_events:
            emitter.connect(callback)
        self.destroyed.connect(lambda *_: self.release())

    # --- lifetime --------------------------------------------------------------------------------
    def event(self, e: QEvent) -> bool:
        """Qt's event handler: leaving the dock ends the widget (napari re-creates one when reopened)."""
        if e.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:  # taken out of its dock (napari's ✕): this widget is done
                self.release()
        return super().event(e)

    def release(self) -> None:
        """Cancel a running question, close every session and stop following the viewer (idempotent).

        Touches no Qt object: it also runs once the widget's Qt side is destroyed.
        """
        if self._cancel is not None:
            self._cancel.cancel()
        if self._worker is not None:
            self._worker.quit()
        self._top.stop()
        for emitter, callback in self._layer_events:
            emitter.disconnect(callback)
        self._layer_events = ()
        self._sessions.close()

    def _on_layer_removed(self, event: Any) -> None:
        """A slide layer is gone: close its sessions unless another layer still shows that file."""
        if event.value is self._top.image:
            self._top.clear_tiles()
        info = slide_info(event.value)
        if info is not None and not any(
            (other := slide_info(lyr)) is not None and other["path"] == info["path"]
            for lyr in self.viewer.layers
        ):
            self._sessions.release_slide(info["path"])

    # --- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        form = QFormLayout()
        self._image_combo = QComboBox()
        self._shapes_combo = QComboBox()
        self._mpp = QDoubleSpinBox()
        self._mpp.setDecimals(4)
        self._mpp.setRange(0.0, 100.0)
        self._mpp.setSingleStep(0.05)
        self._mpp.setSpecialValueText("from file")
        self._mpp.setToolTip("µm per level-0 pixel; 'from file' uses the slide's metadata")
        self._scope = QComboBox()
        self._scope.addItems(SCOPES)
        self._run_on = QComboBox()
        self._run_on.addItems([LOCAL, SERVER])
        self._run_on.setToolTip(
            "Answer with a model on this computer, or on a lab's `wsi-llava serve` server"
        )
        self._run_on.currentTextChanged.connect(self._on_run_on)
        self._server_url = QLineEdit()
        self._server_url.setPlaceholderText("http://HOST:PORT")
        self._token_file = QLineEdit()
        self._token_file.setPlaceholderText("file with the server's token (empty: $WSI_LLAVA_TOKEN)")
        self._test_btn = QPushButton("Test connection")
        self._test_btn.setToolTip(
            "Check the server answers, speaks this API and accepts the token; list its models"
        )
        self._test_btn.clicked.connect(self._on_test_connection)
        self._model = ModelBox()
        self._model.about_to_open.connect(self._refresh_models)
        self._model.currentIndexChanged.connect(self._on_model_changed)
        self._add_model_btn = QPushButton("Add model…")
        self._add_model_btn.setToolTip("Register a model from its downloaded parts (LLaVA + Prov-GigaPath)")
        self._add_model_btn.clicked.connect(self._on_add_model)
        self._remove_model_btn = QPushButton("Remove")
        self._remove_model_btn.setToolTip("Forget the selected user model (its files stay where they are)")
        self._remove_model_btn.clicked.connect(self._on_remove_model)
        self._model.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self._model.setMinimumContentsLength(12)  # long model names must not widen the dock
        model_row = QHBoxLayout()
        model_row.addStretch(1)
        model_row.addWidget(self._add_model_btn)
        model_row.addWidget(self._remove_model_btn)
        self._preset = QComboBox()
        self._preset.addItem("preset…")
        self._preset.addItems(list(PRESETS))
        self._preset.currentTextChanged.connect(self._on_preset)
        self._question = QPlainTextEdit()
        self._question.setPlaceholderText("Ask about the slide or the selected regions")
        self._question.setMaximumHeight(60)
        self._max_tokens = QSpinBox()
        self._max_tokens.setRange(1, 2048)
        self._max_tokens.setValue(128)
        self._temperature = QDoubleSpinBox()
        self._temperature.setRange(0.0, 2.0)
        self._temperature.setSingleStep(0.1)
        self._temperature.setSpecialValueText("model default")
        self._evidence = QCheckBox("evidence overlay")
        self._evidence.setChecked(True)
        self._overwrite = QCheckBox("overwrite existing descriptions")
        form.addRow("slide", self._image_combo)
        form.addRow("regions", self._shapes_combo)
        form.addRow("µm/px", self._mpp)
        form.addRow("scope", self._scope)
        form.addRow("run on", self._run_on)
        form.addRow("server", self._server_url)
        form.addRow("token file", self._token_file)
        form.addRow("", self._test_btn)
        self._server_rows = (self._server_url, self._token_file, self._test_btn)
        form.addRow("model", self._model)
        form.addRow("", model_row)
        form.addRow("question", self._preset)
        form.addRow(self._question)
        form.addRow("max tokens", self._max_tokens)
        form.addRow("temperature", self._temperature)
        form.addRow(self._evidence)

        self._ask_btn = QPushButton("Ask")
        self._describe_btn = QPushButton("Describe selected regions")
        self._cancel_btn = QPushButton("Cancel")
        self._cancel_btn.setEnabled(False)
        self._ask_btn.clicked.connect(self._on_ask)
        self._describe_btn.clicked.connect(self._on_describe)
        self._cancel_btn.clicked.connect(self._on_cancel)
        buttons = QHBoxLayout()
        for b in (self._ask_btn, self._cancel_btn):
            buttons.addWidget(b)
        new_layer = QPushButton("New regions layer")
        new_layer.clicked.connect(self._on_new_regions_layer)

        self._status = QLabel("")
        self._status.setWordWrap(True)
        self._answer = QPlainTextEdit()
        self._answer.setReadOnly(True)
        self._answer.setPlaceholderText("The answer streams here")
        self._warnings = QLabel("")
        self._warnings.setWordWrap(True)
        self._warnings.setStyleSheet("color: #f0a030;")
        self._warnings.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._warnings.hide()
        self._top = TopEvidenceList(self.viewer)
        self._history = QListWidget()
        self._history.setWordWrap(True)
        self._history.currentRowChanged.connect(self._on_history_selected)
        self._copy_btn = QPushButton("Copy")
        self._copy_btn.clicked.connect(self._on_copy)
        self._opacity = QSlider(Qt.Orientation.Horizontal)
        self._opacity.setRange(0, 100)
        self._opacity.setValue(60)
        self._opacity.valueChanged.connect(self._on_opacity)
        opacity_row = QHBoxLayout()
        opacity_row.addWidget(QLabel("evidence opacity"))
        opacity_row.addWidget(self._opacity)

        self._form = form
        self._on_run_on(LOCAL)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self._describe_btn)
        layout.addWidget(self._overwrite)
        layout.addWidget(new_layer)
        layout.addWidget(self._status)
        layout.addWidget(QLabel("answer"))
        layout.addWidget(self._answer)
        layout.addWidget(self._warnings)
        layout.addWidget(QLabel("top evidence"))
        layout.addWidget(self._top)
        history_row = QHBoxLayout()
        history_row.addWidget(QLabel("history"))
        history_row.addStretch(1)
        history_row.addWidget(self._copy_btn)
        layout.addLayout(history_row)
        layout.addWidget(self._history)
        layout.addLayout(opacity_row)

    # --- layer / model lists ---------------------------------------------------------------------
    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Image, Shapes

        def fill(combo: QComboBox, names: list[str]) -> None:
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

        layers = list(self.viewer.layers)
        images = [lyr.name for lyr in layers if isinstance(lyr, Image) and slide_info(lyr) is not None]
        shapes = [lyr.name for lyr in layers if isinstance(lyr, Shapes)]
        fill(self._image_combo, images)
        fill(self._shapes_combo, shapes)
        new = getattr(event, "value", None) if event is not None else None
        if isinstance(new, Shapes) and new.name in shapes:
            self._shapes_combo.setCurrentText(new.name)  # a freshly drawn-on layer is the likely target

    # --- run on: this computer | server ---------------------------------------------------------
    def _on_server(self) -> bool:
        return self._run_on.currentText() == SERVER

    def _server_settings(self) -> ServerSettings:
        return ServerSettings(self._server_url.text().strip(), self._token_file.text().strip())

    def _on_run_on(self, choice: str) -> None:
        for w in self._server_rows:
            self._form.setRowVisible(w, choice == SERVER)
        self._add_model_btn.setVisible(choice != SERVER)
        self._remove_model_btn.setVisible(choice != SERVER)
        if choice != SERVER and self._server_models is not None:
            self._server_models = None
            self._refresh_models()

    def _on_test_connection(self) -> None:
        """Check the server in a thread worker; the outcome is one notification naming any failure."""
        if self._check_worker is not None:
            return
        from napari.qt.threading import create_worker

        settings = self._server_settings()
        worker = create_worker(check_connection, settings, _start_thread=False)
        worker.returned.connect(lambda result: self._on_connection_checked(settings, result))
        worker.finished.connect(self._on_check_finished)
        self._check_worker = worker
        self._test_btn.setEnabled(False)
        self._status.setText(f"connecting to {settings.url or '(no address)'}…")
        worker.start()

    def _on_connection_checked(self, settings: ServerSettings, result: tuple[str, Any]) -> None:
        status, value = result
        if status == "error":
            self._status.setText(f"error: {value}")
            _show_error(str(value))
            return
        health, models = value
        fill_server_models(self._model, models.models)
        self._server_models = settings.url
        message = connected_message(settings, health, models)
        self._status.setText(message.removeprefix("WSI-LLaVA: "))
        _show_info(message)

    def _on_check_finished(self) -> None:
        self._check_worker = None
        self._test_btn.setEnabled(True)

    def _refresh_models(self, select: str | None = None) -> None:
        """Re-read built-in and user models into the box, keeping the current one (or ``select``); in server
        mode the box lists the server's models (from Test connection) instead."""
        from wsi_llava.registry import list_models

        if self._on_server():
            return
        try:
            entries = list_models()
        except OSError as e:  # an unreadable models folder: keep what the box shows
            _show_error(f"cannot read the registered models: {e}")
            return
        fill_model_box(self._model, entries, select=select)

    def _model_entry(self) -> Any:
        """The registry entry of the selected model, or None."""
        return self._model.currentData(ENTRY_ROLE)

    def _on_model_changed(self, index: int = -1) -> None:
        entry = self._model_entry()
        self._remove_model_btn.setEnabled(entry is not None and entry.kind == "user" and self._worker is None)
        if entry is not None and entry.problem:
            self._status.setText(f"⚠ model {entry.name!r} is unavailable here: {entry.problem}")
        elif self._status.text().startswith("⚠ model"):
            self._status.setText("")

    def _on_add_model(self) -> AddModelDialog:
        """Open the Add model dialog (one at a time); a registered model is then listed and selected."""
        if self._add_dialog is not None and self._add_dialog.isVisible():
            self._add_dialog.raise_()
            return self._add_dialog
        dialog = AddModelDialog(self)
        dialog.registered.connect(self._on_model_registered)
        self._add_dialog = dialog
        dialog.open()
        return dialog

    def _on_model_registered(self, report: Any) -> None:
        forget_model(report.name)  # an overwritten model must not answer from its old parts
        self._refresh_models(select=report.name)
        _show_info(report_message(report))

    def _on_remove_model(self) -> None:
        from wsi_llava.registry import remove_model

        entry = self._model_entry()
        if entry is None or entry.kind != "user" or self._worker is not None:
            return
        if not confirm_remove(self, entry):
            return
        try:
            folder = remove_model(entry.name)
        except (WsiLlavaError, OSError) as e:
            _show_error(str(e))
            return
        forget_model(entry.name)
        self._refresh_models()
        _show_info(f"WSI-LLaVA: removed model {entry.name!r} ({folder}); the files it named are untouched")

    def _image_layer(self) -> Any:
        name = self._image_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None  # noqa: SIM401

    def _shapes_layer(self) -> Any:
        name = self._shapes_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None  # noqa: SIM401

    # --- small actions ---------------------------------------------------------------------------
    def _on_preset(self, key: str) -> None:
        if key in PRESETS:
            self._question.setPlainText(PRESETS[key])

    def _on_opacity(self, value: int) -> None:
        if LAYER_NAME in self.viewer.layers:
            self.viewer.layers[LAYER_NAME].opacity = value / 100.0

    def _on_copy(self) -> None:
        row = self._history.currentRow()
        if 0 <= row < len(self.history):
            QApplication.clipboard().setText(self.history[row].text)

    def _on_history_selected(self, row: int) -> None:
        if 0 <= row < len(self.history):
            image = self._image_layer()
            answer = self.history[row].answer
            self._show_warnings(answer)
            if image is not None and answer.slide == image.metadata[META_KEY]["path"]:
                self._show_evidence(answer, tuple(image.metadata[META_KEY]["dimensions"]), image)
            else:
                self._top.clear_tiles()

    def _on_new_regions_layer(self) -> Any:
        """Add an empty Shapes layer in the slide's coordinates, ready to draw rectangles."""
        image = self._image_layer()
        scale = tuple(image.scale[-2:]) if image is not None else (1.0, 1.0)
        translate = tuple(image.translate[-2:]) if image is not None else (0.0, 0.0)
        extent = max(image.metadata[META_KEY]["dimensions"]) if image is not None else 2048
        from napari_wsi_llava._shapes import empty_features

        units = tuple(str(u) for u in image.units[-2:]) if image is not None else None
        kw = layer_kwargs(
            REGIONS_LAYER, empty_features(0), scale, translate, extent=extent, units=units, color="cyan"
        )
        layer = self.viewer.add_shapes(None, ndim=2, **kw)
        layer.mode = "add_rectangle"
        self._shapes_combo.setCurrentText(layer.name)
        return layer

    # --- asking ----------------------------------------------------------------------------------
    def _on_ask(self) -> None:
        question = self._question.toPlainText().strip()
        self._start(question, self._scope.currentText(), target="answer")

    def _on_describe(self) -> None:
        self._start(DESCRIBE_QUESTION, "selected shapes", target="description")

    def _on_cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
        if self._worker is not None:
            self._worker.quit()
        self._status.setText("cancelling…")

    def _start(self, question: str, scope: str, target: str) -> None:
        try:
            slide, mpp, image, model, jobs, layer = self._prepare(question, scope, target)
        except WsiLlavaError as e:
            _show_error(str(e))
            return
        if not jobs:
            _show_info("every selected shape already has a description; tick 'overwrite' to replace them")
            return
        from napari.qt.threading import create_worker

        self._jobs, self._job_layer, self._job_image = jobs, layer, image
        self._cancel = CancelToken()
        settings = {
            "max_new_tokens": self._max_tokens.value(),
            "temperature": self._temperature.value() or None,
            "evidence": self._evidence.isChecked(),
        }
        if (
            self._on_server()
        ):  # the same events, answered by the server (its models if listed, else its default)
            served = model if self._server_models == self._server_settings().url else None
            dimensions = tuple(image.metadata[META_KEY]["dimensions"])
            run = (server_ask_events, self._server_settings(), self._uploads, slide, dimensions, served)
        else:
            run = (ask_events, self._sessions, slide, model, mpp)
        worker = create_worker(*run, jobs, self._cancel, **settings, _start_thread=False)
        worker.yielded.connect(self._on_event)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run_warnings = set()
        self._set_busy(True)
        self._answer.clear()
        self._show_warnings(None)
        worker.start()

    def _prepare(self, question: str, scope: str, target: str) -> tuple:
        """Check the input on the GUI thread and turn the viewer's state into jobs (no core work)."""
        if self._worker is not None:
            raise WsiLlavaError("a question is already running: wait for it or press Cancel")
        image = self._image_layer()
        if image is None:
            raise WsiLlavaError(
                "no slide is open: open a .svs/.ndpi/.mrxs/.tif/.tiff/.ome.tiff file or File > Open Sample > "
                "WSI-LLaVA demo slide"
            )
        info = image.metadata[META_KEY]
        mpp = self._mpp.value() or None
        if mpp is None and not info.get("mpp"):
            problem = info.get("mpp_problem") or "the slide records no microns per pixel (µm/px)"
            raise WsiLlavaError(
                f"{info['path']}: {problem}; enter the slide's true µm/px in the WSI-LLaVA widget's µm/px box "
                "(e.g. 0.5)"
            )
        model = self._model.currentData(NAME_ROLE)
        if not model:
            raise WsiLlavaError(
                "no model is registered with wsi-llava: press 'Add model…' or install a model plugin"
            )
        if not question:
            raise WsiLlavaError("question is empty: type a question or pick a preset")
        if scope == "whole slide":
            return info["path"], mpp, image, model, [Job(question)], None
        layer = self._shapes_layer()
        if layer is None:
            raise RegionError(
                "no Shapes layer: draw regions first ('New regions layer') or ask the whole slide"
            )
        if scope == "selected shapes":
            indices = sorted(layer.selected_data)
            if not indices:
                raise RegionError(
                    f"no shape is selected on {layer.name!r}: select shapes or change the scope"
                )
        else:
            indices = list(range(len(layer.data)))
            if not indices:
                raise RegionError(f"{layer.name!r} has no shapes: draw a rectangle or polygon first")
        meta = layer.metadata.get(META_KEY, {})
        regions = layer_to_regions(
            layer.data,
            layer.shape_type,
            layer.features,
            layer_scale=layer.scale[-2:],
            layer_translate=layer.translate[-2:],
            image_scale=image.scale[-2:],
            image_translate=image.translate[-2:],
            indices=indices,
            layer_name=layer.name,
        )
        w, h = info["dimensions"]
        descriptions = normalise_features(layer.features, len(layer.data))["description"]
        jobs = []
        for index, region in zip(indices, regions, strict=True):
            title = f"{layer.name} shape {index}" + (f" ({region.name})" if region.name else "")
            region.check_within(w, h, source=title)
            if target == "description" and not self._overwrite.isChecked() and descriptions.iloc[index]:
                continue
            jobs.append(Job(question, region, index, target, title))
        # remember which slide the layer annotates so the GeoJSON writer converts to level-0 exactly
        layer.metadata = {
            **layer.metadata,
            META_KEY: {**meta, **image_transform_meta(image.scale, image.translate)},
        }
        return info["path"], mpp, image, model, jobs, layer

    def _set_busy(self, busy: bool) -> None:
        self._ask_btn.setEnabled(not busy)
        self._describe_btn.setEnabled(not busy)
        self._cancel_btn.setEnabled(busy)
        self._add_model_btn.setEnabled(not busy)
        self._run_on.setEnabled(not busy)
        entry = self._model_entry()
        self._remove_model_btn.setEnabled(not busy and entry is not None and entry.kind == "user")

    # --- events from the worker (GUI thread) -----------------------------------------------------
    def _on_event(self, event: tuple) -> None:
        kind = event[0]
        if kind == "tick":
            return
        if kind == "status":
            self._status.setText(event[1])
        elif kind == "progress":
            self._on_progress(*event[1:])
        elif kind == "start":
            job = self._jobs[event[1]]
            self._close_pbar()
            self._status.setText(f"answering: {job.title} ({event[1] + 1}/{len(self._jobs)})")
            if event[1] > 0:
                self._answer.appendPlainText("")
            self._answer.appendPlainText(f"[{job.title}] ")
        elif kind == "token":
            cursor = self._answer.textCursor()
            cursor.movePosition(cursor.MoveOperation.End)
            cursor.insertText(event[2])
            self._answer.setTextCursor(cursor)
        elif kind == "answer":
            self._on_answer(self._jobs[event[1]], event[2], tuple(event[3]))
        elif kind == "uploaded":
            ref = event[1]
            _show_info(
                f"WSI-LLaVA: uploaded the slide to the server ({ref.size} bytes, stored as {ref.filename})"
            )
        elif kind == "error":
            err = event[1]
            if isinstance(err, Cancelled):
                self._status.setText("cancelled")
                _show_info("WSI-LLaVA: cancelled; nothing partial was kept")
            else:
                self._status.setText(f"error: {err}")
                _show_error(str(err))

    def _on_progress(self, done: int, total: int, message: str) -> None:
        from napari.utils import progress

        if self._pbar is None and total and done < total:
            self._pbar = progress(total=total, desc=message)
        if self._pbar is not None:
            self._pbar.set_description(message)
            self._pbar.n = done
            self._pbar.refresh()
            if total and done >= total:
                self._close_pbar()
        self._status.setText(f"{message}: {done}/{total}")

    def _close_pbar(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def _on_answer(self, job: Job, answer: Answer, dimensions: tuple[int, int]) -> None:
        from wsi_llava.plugins import sinks

        context = {
            "frontend": "napari",
            "viewer": self.viewer,
            "shapes_layer": self._job_layer if job.shape_index is not None else None,
            "shape_index": job.shape_index,
            "target": job.target,
            "image_layer": self._job_image,
        }
        for entry in sinks().values():
            try:
                entry.fn(answer, context)
            except Exception as e:  # one broken sink must not lose the answer
                logger.exception("result sink %s failed", entry.name)
                _show_error(f"result sink {entry.name!r} ({entry.plugin}) failed: {e}")
        notes = answer_notes(answer)
        if notes:
            self._answer.appendPlainText("\n".join(notes))
        self._show_warnings(answer)
        for warning in answer.warnings:
            if warning not in self._run_warnings:  # once per run, however many shapes share it
                self._run_warnings.add(warning)
                _show_warning(f"WSI-LLaVA ({answer.model}): {warning}")
        entry = HistoryEntry(answer, job.title, time.strftime("%H:%M:%S"))
        self.history.append(entry)
        item = QListWidgetItem(entry.text)
        if answer.warnings:
            item.setIcon(self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning))
            item.setToolTip("\n".join(answer.warnings))
        self._history.addItem(item)
        self._history.blockSignals(True)
        self._history.setCurrentRow(len(self.history) - 1)
        self._history.blockSignals(False)
        self._show_evidence(answer, dimensions, self._job_image)

    def _show_warnings(self, answer: Answer | None) -> None:
        """Show the warnings of the answer on display (the latest, or the history row selected)."""
        warnings = list(answer.warnings) if answer is not None else []
        self._warnings.setText("\n".join(f"⚠ {w}" for w in warnings))
        self._warnings.setVisible(bool(warnings))

    def _show_evidence(self, answer: Answer, dimensions: tuple[int, int], image: Any) -> None:
        """Show the evidence of the answer on display: heat map and top tiles (blank / empty without any)."""
        self._top.show_answer(answer, image)
        if not answer.evidence.coords and LAYER_NAME not in self.viewer.layers:
            return
        heat, origin, tile = evidence_heatmap(answer.evidence, dimensions)
        kw = evidence_layer_kwargs(origin, tile, image.scale, image.translate, self._opacity.value() / 100.0)
        if LAYER_NAME in self.viewer.layers:
            layer = self.viewer.layers[LAYER_NAME]
            layer.data = heat
            layer.scale, layer.translate = kw["scale"], kw["translate"]
        else:
            index = list(self.viewer.layers).index(image) + 1 if image in self.viewer.layers else None
            layer = self.viewer.add_image(heat, units=tuple(image.units), **kw)
            if index is not None:
                self.viewer.layers.move(list(self.viewer.layers).index(layer), index)
        layer.metadata = {META_KEY: {"question": answer.question, "slide": answer.slide}}

    def _on_finished(self) -> None:
        self._close_pbar()
        self._worker = None
        self._cancel = None
        self._set_busy(False)
        if self._status.text().startswith(("answering", "tile features", "loading", "extracting")):
            self._status.setText("done")
        elif self._status.text() == "cancelling…":
            self._status.setText("cancelled")
