"""Progress reporting and cancellation for long steps (extraction, synthesis, loading).

Core code takes a plain callback and a cancel token; frontends adapt them (tqdm-like logging in the
CLI, napari progress bars, QuPath dialogs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from wsi_llava.errors import Cancelled

#: ``progress(done, total, message)``; ``total`` may be 0 when unknown.
ProgressCallback = Callable[[int, int, str], None]


def no_progress(done: int, total: int, message: str) -> None:
    """Default progress callback: does nothing."""


class CancelToken:
    """A thread-safe flag that long-running loops poll between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")
