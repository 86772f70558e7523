"""The widget's model box and the **Add model…** dialog: built-in and user models from the core's registry.

Thin by design: the box shows :func:`wsi_llava.registry.list_models`; the dialog turns its fields into one
:func:`wsi_llava.registry.add_model` call, run in a napari thread worker because checking a 7B LLaVA folder
reads many headers. A part that is missing or does not fit leaves the dialog open with the core's message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from wsi_llava.errors import ModelError, WsiLlavaError

logger = logging.getLogger(__name__)

#: item data roles of the model box: the plain model name, and its registry entry
NAME_ROLE = Qt.ItemDataRole.UserRole
ENTRY_ROLE = Qt.ItemDataRole.UserRole + 1
TEMPLATES = {"from the checkpoint": None, "vicuna_v1": "vicuna_v1", "llava_v1": "llava_v1", "chat": "chat"}
SLIDE_ENCODER_HINT = "optional: slide_encoder.pth beside the tile encoder"


def item_text(entry: Any) -> str:
    """How the box shows a model: built-in ones by name, user ones marked (and flagged when unusable)."""
    if entry.kind != "user":
        return entry.name
    return f"{entry.name} (user)" if entry.resolves else f"{entry.name} (user, unavailable)"


def item_tooltip(entry: Any) -> str:
    """What a model is made of, or why it cannot be used on this machine."""
    lines = [entry.description] if entry.description else []
    if entry.folder:
        lines.append(f"registered in {entry.folder}")
    lines += [f"{part}: {src}" for part, src in entry.sources.items()]
    if entry.problem:
        lines.append(f"unavailable here: {entry.problem}")
    return "\n".join(lines)


def fill_model_box(combo: QComboBox, entries: list[Any], select: str | None = None) -> None:
    """Replace the box's items with ``entries``; keep ``select`` (else the current model, else demo)."""
    keep = select or combo.currentData(NAME_ROLE) or "demo"
    warning = combo.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
    combo.blockSignals(True)
    combo.clear()
    for entry in entries:
        if entry.resolves:
            combo.addItem(item_text(entry))
        else:
            combo.addItem(warning, item_text(entry))
        row = combo.count() - 1
        combo.setItemData(row, entry.name, NAME_ROLE)
        combo.setItemData(row, entry, ENTRY_ROLE)
        combo.setItemData(row, item_tooltip(entry), Qt.ItemDataRole.ToolTipRole)
    index = combo.findData(keep, NAME_ROLE)
    if index < 0 and combo.count():
        index = max(combo.findData("demo", NAME_ROLE), 0)
    combo.setCurrentIndex(index)
    combo.blockSignals(False)
    combo.currentIndexChanged.emit(combo.currentIndex())


def fill_server_models(combo: QComboBox, models: list[Any]) -> None:
    """Replace the box's items with a server's models (``ModelInfo``), its default model selected."""
    keep = combo.currentData(NAME_ROLE)
    combo.blockSignals(True)
    combo.clear()
    for info in models:
        combo.addItem(info.name + (" (default)" if info.default else ""))
        row = combo.count() - 1
        combo.setItemData(row, info.name, NAME_ROLE)
        combo.setItemData(row, None, ENTRY_ROLE)  # not in this computer's registry
        combo.setItemData(row, info.description or "on the server", Qt.ItemDataRole.ToolTipRole)
    index = combo.findData(keep, NAME_ROLE)
    if index < 0:
        index = next((i for i, m in enumerate(models) if m.default), 0 if models else -1)
    combo.setCurrentIndex(index)
    combo.blockSignals(False)
    combo.currentIndexChanged.emit(combo.currentIndex())


class ModelBox(QComboBox):
    """A combo box that re-reads the registry whenever it opens (models added from the CLI show up)."""

    about_to_open = Signal()

    def showPopup(self) -> None:  # noqa: N802 (Qt's name)
        self.about_to_open.emit()
        super().showPopup()


def register_model(
    name: str,
    llava: str,
    tile_encoder: str,
    llava_base: str | None,
    slide_encoder: str | None,
    template: str | None,
    overwrite: bool,
) -> tuple[str, Any]:
    """Run the core's ``add_model`` (in a worker thread): ``("ok", report)`` or ``("error", the user error)``.

    User errors come back as values so the dialog can show them; anything else is a bug and raises.
    """
    from wsi_llava.registry import add_model

    try:
        report = add_model(
            name,
            llava=llava,
            tile_encoder=tile_encoder,
            llava_base=llava_base,
            slide_encoder=slide_encoder,
            template=template,
            overwrite=overwrite,
        )
    except WsiLlavaError as e:
        return "error", e
    return "ok", report


def report_message(report: Any) -> str:
    """One notification for a registered model: where it lives and what each part holds."""
    parts = "; ".join(f"{p.part}: {p.summary}" for p in report.parts)
    return f"WSI-LLaVA: registered model {report.name!r} in {report.folder} ({parts}). The widths fit."


class _PathField(QWidget):
    """A line edit for a folder, file or repo id, with a Browse… button."""

    def __init__(self, placeholder: str, pick: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.pick = pick  # "folder" or "file"
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        self.edit.setClearButtonEnabled(True)
        self.browse = QPushButton("Browse…")
        self.browse.clicked.connect(self._on_browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit, 1)
        row.addWidget(self.browse)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str | Path) -> None:  # noqa: N802 (Qt's name)
        self.edit.setText(str(text))

    def _on_browse(self) -> None:
        start = self.text() if self.text() and Path(self.text()).expanduser().exists() else str(Path.home())
        if self.pick == "folder":
            chosen = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        else:
            chosen, _ = QFileDialog.getOpenFileName(
                self, "Choose the slide encoder", start, "PyTorch weights (*.pth *.pt *.bin);;All files (*)"
            )
        if chosen:
            self.setText(chosen)


class AddModelDialog(QDialog):
    """Register a model from its parts: checks run in a thread worker, errors keep the dialog open."""

    registered = Signal(object)  # the core's ModelReport

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("WSI-LLaVA: add a model")
        self.setModal(True)
        self.worker: Any = None
        intro = QLabel(
            "Register a model from the folders you downloaded (nothing is copied). A part can also be a "
            "Hugging Face repo id (ORG/NAME) already in the local cache; nothing is downloaded. Every "
            "part is checked before the model is registered."
        )
        intro.setWordWrap(True)
        self.name = QLineEdit()
        self.name.setPlaceholderText("e.g. wsi-llava-e1")
        self.llava = _PathField("LLaVA checkpoint folder or ORG/NAME", "folder")
        self.llava_base = _PathField("optional: base LLM of a LoRA checkpoint", "folder")
        self.tile_encoder = _PathField("Prov-GigaPath folder or ORG/NAME", "folder")
        self.slide_encoder = _PathField(SLIDE_ENCODER_HINT, "file")
        self.template = QComboBox()
        self.template.addItems(list(TEMPLATES))
        self.overwrite = QCheckBox("replace a model registered under this name")
        form = QFormLayout()
        form.addRow("name", self.name)
        form.addRow("LLaVA", self.llava)
        form.addRow("LLaVA base", self.llava_base)
        form.addRow("tile encoder", self.tile_encoder)
        form.addRow("slide encoder", self.slide_encoder)
        form.addRow("template", self.template)
        form.addRow(self.overwrite)
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setTextVisible(False)
        self.busy.setMaximumHeight(8)
        self.busy.hide()
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        self.ok_button = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.ok_button.setText("Add")
        self.buttons.accepted.connect(self.submit)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.busy)
        layout.addWidget(self.message)
        layout.addWidget(self.buttons)
        self.setMinimumWidth(520)
        self._inputs = [
            self.name,
            self.llava,
            self.llava_base,
            self.tile_encoder,
            self.slide_encoder,
            self.template,
            self.overwrite,
        ]

    # --- checks on the GUI thread: named after the dialog's fields, instant ---------------------------
    def _arguments(self) -> dict[str, Any]:
        """The fields as ``add_model`` arguments; empty or missing entries raise naming the field."""
        from wsi_llava.registry import check_name, user_model
        from wsi_llava.sources import canonical_source

        name = self.name.text().strip()
        if not name:
            raise ModelError("name is empty: give the model a name (e.g. wsi-llava-e1)")
        check_name(name)
        if not self.overwrite.isChecked() and (folder := user_model(name)) is not None:
            raise ModelError(
                f"model {name!r} is already registered ({folder}): choose another name, or tick "
                f"'{self.overwrite.text()}'"
            )
        sources: dict[str, str | None] = {}
        for key, field, label, required in (
            ("llava", self.llava, "LLaVA", True),
            ("llava_base", self.llava_base, "LLaVA base", False),
            ("tile_encoder", self.tile_encoder, "tile encoder", True),
            ("slide_encoder", self.slide_encoder, "slide encoder", False),
        ):
            text = field.text()
            if not text:
                if required:
                    raise ModelError(f"{label} is empty: choose its folder (Browse…) or type a repo id")
                sources[key] = None
                continue
            sources[key] = canonical_source(text, label)
        return {
            "name": name,
            **sources,
            "template": TEMPLATES[self.template.currentText()],
            "overwrite": self.overwrite.isChecked(),
        }

    def submit(self) -> None:
        """Check the fields, then run ``add_model`` in a thread worker; the dialog stays responsive."""
        if self.worker is not None:
            return
        try:
            kwargs = self._arguments()
        except WsiLlavaError as e:
            self._show_problem(str(e))
            return
        from napari.qt.threading import create_worker

        worker = create_worker(register_model, _start_thread=False, **kwargs)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_busy(True)
        self.message.setStyleSheet("")
        self.message.setText(f"checking the parts of {kwargs['name']!r} (configs and weight headers)…")
        worker.start()

    def _set_busy(self, busy: bool) -> None:
        for w in self._inputs:
            w.setEnabled(not busy)
        for b in self.buttons.buttons():
            b.setEnabled(not busy)
        self.busy.setVisible(busy)

    def _show_problem(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.message.setStyleSheet("color: #e0564b;")
        self.message.setText(text)
        show_error(text)

    def _on_returned(self, result: tuple[str, Any]) -> None:
        status, value = result
        if status == "error":
            self._show_problem(str(value))
            return
        self.message.setStyleSheet("")
        self.message.setText(f"registered {value.name!r}")
        self.registered.emit(value)
        self.accept()

    def _on_errored(self, exc: Exception) -> None:  # napari's worker already notified, with traceback
        logger.error("adding a model failed unexpectedly: %s", exc, exc_info=exc)
        self.message.setStyleSheet("color: #e0564b;")
        self.message.setText(f"unexpected error while checking the parts: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_busy(False)

    def reject(self) -> None:
        """Cancel closes the dialog, but not while a check runs (it would register behind the user's back)."""
        if self.worker is None:
            super().reject()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        if self.worker is not None:
            event.ignore()
        else:
            super().closeEvent(event)


def confirm_remove(parent: QWidget, entry: Any) -> bool:
    """Ask before forgetting a user model; its weights stay where they are."""
    answer = QMessageBox.question(
        parent,
        "Remove model",
        f"Forget the model {entry.name!r}?\n\nOnly its registration ({entry.folder}) is deleted; "
        "the folders it names stay where they are.",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No,
    )
    return answer == QMessageBox.StandardButton.Yes
