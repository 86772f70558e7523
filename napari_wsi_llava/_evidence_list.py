"""The dock's "top evidence" list: the answer's most relevant tiles as thumbnails; a click goes there.

Items appear at once with their rank and relevance; the thumbnails stream in from a thread worker
(reading the image layer's pyramid), which a newer answer or clearing the list quits. The logic is in
:mod:`napari_wsi_llava._top_evidence`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QColor, QIcon, QImage, QPixmap
from qtpy.QtWidgets import QListView, QListWidget, QListWidgetItem, QWidget

from napari_wsi_llava._top_evidence import (
    THUMB,
    TOP_N,
    TopTile,
    focus_tile,
    iter_thumbnails,
    layer_levels,
    top_tiles,
)

if TYPE_CHECKING:
    import napari

    from wsi_llava.answer import Answer

logger = logging.getLogger(__name__)

RANK_ROLE = Qt.ItemDataRole.UserRole


def _icon(thumb: np.ndarray) -> QIcon:
    h, w = thumb.shape[:2]
    image = QImage(thumb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()  # owns its pixels
    return QIcon(QPixmap.fromImage(image))


class TopEvidenceList(QListWidget):
    """Up to ``TOP_N`` tiles of the answer on display, most relevant first; click one to centre on it."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.tiles: list[TopTile] = []
        self.thumbnails: dict[int, np.ndarray] = {}  # by rank, as read
        self.image: Any = None
        self._worker: Any = None
        self._generation = 0
        blank = QPixmap(THUMB, THUMB)
        blank.fill(QColor(128, 128, 128))
        self._placeholder = QIcon(blank)
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setFlow(QListView.Flow.LeftToRight)
        self.setWrapping(True)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)
        self.setUniformItemSizes(True)
        self.setIconSize(QSize(THUMB, THUMB))
        self.setGridSize(QSize(THUMB + 14, THUMB + self.fontMetrics().height() + 10))
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # tall enough for all
        self._fit_height()
        self.setToolTip("The answer's most relevant tiles (rank · relevance); click one to go there")
        self.itemClicked.connect(self._on_item)
        self.itemActivated.connect(self._on_item)

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        """Qt's resize handler: keep every one of the ``TOP_N`` places visible at the new width."""
        super().resizeEvent(event)
        self._fit_height()

    def _fit_height(self) -> None:
        grid = self.gridSize()
        per_row = max(1, self.viewport().width() // grid.width())
        rows = -(-TOP_N // per_row)
        height = rows * grid.height() + 2 * self.frameWidth() + 6
        if height != self.height():
            self.setFixedHeight(height)

    @property
    def loading(self) -> bool:
        """Whether thumbnails are still being read."""
        return self._worker is not None

    def show_answer(self, answer: Answer | None, image: Any) -> None:
        """List the top tiles of ``answer`` over the slide layer ``image``; none (cleared) without evidence."""
        self.clear_tiles()
        tiles = top_tiles(answer.evidence, TOP_N) if answer is not None and image is not None else []
        if not tiles:
            return
        self.tiles, self.image = tiles, image
        for t in tiles:
            item = QListWidgetItem(self._placeholder, t.label)
            item.setData(RANK_ROLE, t.rank)
            item.setToolTip(
                f"#{t.rank}: tile {t.tile_index} at level-0 ({t.xy[0]}, {t.xy[1]}), {t.tile} px; "
                f"relevance {t.score * 100:.1f} %"
            )
            self.addItem(item)
        self._read_thumbnails(image, tiles)

    def clear_tiles(self) -> None:
        """Empty the list and stop reading thumbnails."""
        self.stop()
        self.clear()
        self.tiles, self.thumbnails, self.image = [], {}, None

    def stop(self) -> None:
        """Quit the thumbnail worker (its late results are ignored)."""
        self._generation += 1
        if self._worker is not None:
            self._worker.quit()
            self._worker = None

    def _read_thumbnails(self, image: Any, tiles: list[TopTile]) -> None:
        from napari.qt.threading import create_worker

        generation = self._generation
        worker = create_worker(
            iter_thumbnails, layer_levels(image), tiles, rgb=bool(image.rgb), _start_thread=False
        )
        worker.yielded.connect(lambda got: self._on_thumbnail(generation, *got))
        worker.finished.connect(lambda: self._on_done(generation))
        self._worker = worker
        worker.start()

    def _on_thumbnail(self, generation: int, rank: int, thumb: np.ndarray | None) -> None:
        if generation != self._generation or thumb is None:
            return
        self.thumbnails[rank] = thumb
        self.item(rank - 1).setIcon(_icon(thumb))

    def _on_done(self, generation: int) -> None:
        if generation == self._generation:
            self._worker = None

    def _on_item(self, item: QListWidgetItem) -> None:
        image = self.image
        if image is None or image not in self.viewer.layers:
            return
        focus_tile(self.viewer, image, self.tiles[int(item.data(RANK_ROLE)) - 1])
