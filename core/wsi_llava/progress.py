"""Progress reporting and cancellation for long steps (extraction, synthesis, loading).

Core code takes a plain callback and a cancel token; frontends adapt them (tqdm-like logging in the
CLI, napari progress bars, QuPath dialogs).
"""

from __future__ import annotations

import sys
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


class TerminalProgress:
    """A ``ProgressCallback`` drawing one tqdm bar per message on stderr (silent when not a terminal)."""

    def __init__(self) -> None:
        self._bars: dict[str, object] = {}

    def __call__(self, done: int, total: int, message: str) -> None:
        from tqdm import tqdm

        bar = self._bars.get(message)
        if bar is None:
            bar = self._bars[message] = tqdm(total=total or None, desc=message, file=sys.stderr, disable=None)
        bar.n = done  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]
        if total and done >= total:
            bar.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()  # type: ignore[attr-defined]
