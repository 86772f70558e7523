"""Screenshot the napari plugin answering one question: the canvas (slide + evidence heat map) and the
WSI-LLaVA dock (answer + top-evidence list), as two PNG files.

Opens the slide with the plugin's reader, docks the widget, asks the question about the whole slide or
``--region x,y,w,h`` (level-0 px) and waits for the answer and its thumbnails. Needs a display; on a
headless machine run it under Xvfb::

    xvfb-run -a python scripts/napari_screenshot.py SLIDE --canvas canvas.png --dock dock.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("napari_screenshot")

PLUGIN = "wsi-llava"


def region_arg(text: str) -> tuple[int, int, int, int]:
    """``x,y,w,h`` in level-0 pixels, width and height positive."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--region must be x,y,w,h (four integers), got {text!r}") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise argparse.ArgumentTypeError(f"--region needs x, y >= 0 and w, h > 0, got {text!r}")
    return x, y, w, h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slide", type=Path, help="the slide to open (.svs .ndpi .mrxs .tif .tiff .ome.tiff)")
    p.add_argument("--canvas", type=Path, required=True, help="PNG of the canvas (slide + heat map)")
    p.add_argument(
        "--dock", type=Path, required=True, help="PNG of the WSI-LLaVA dock (answer + top evidence)"
    )
    p.add_argument("--question", default="Is there tumour on this slide?")
    p.add_argument(
        "--region", type=region_arg, help="ask about x,y,w,h (level-0 px) instead of the whole slide"
    )
    p.add_argument("--model", default="demo", help="a registered model name (default: the demo model)")
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel, when the file records none")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--focus", action="store_true", help="click the most relevant tile before the screenshots")
    p.add_argument("--size", type=int, nargs=2, default=(1400, 900), metavar=("W", "H"), help="window size")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the answer")
    return p.parse_args(argv)


def _wait(app: Any, done: Any, timeout: float, what: str) -> None:
    """Run the Qt event loop until ``done()`` or ``timeout`` seconds (then raise naming ``what``)."""
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            raise TimeoutError(f"no {what} after {timeout:g} s")
        app.processEvents()
        time.sleep(0.02)


def _settle(app: Any, seconds: float = 1.0) -> None:
    """Let napari draw (and load the visible chunks) before a screenshot."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def run(args: argparse.Namespace) -> int:
    import napari
    import numpy as np
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_wsi_llava._models import NAME_ROLE
    from wsi_llava.atomic import atomic_path, check_writable

    for out in (args.canvas, args.dock):
        check_writable(out)
    if not args.slide.is_file():
        logger.error("%s: no such slide file", args.slide)
        return 2
    viewer = napari.Viewer(show=True)
    try:
        app = QApplication.instance()
        viewer.window._qt_window.resize(*args.size)
        layers = viewer.open(args.slide, plugin=PLUGIN)
        if not layers:
            logger.error("%s: the wsi-llava reader could not open this slide", args.slide)
            return 2
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "WSI-LLaVA")
        index = widget._model.findData(args.model, NAME_ROLE)
        if index < 0:
            logger.error("model %r is not registered (see `wsi-llava models`)", args.model)
            return 2
        widget._model.setCurrentIndex(index)
        if args.mpp:
            widget._mpp.setValue(args.mpp)
        widget._question.setPlainText(args.question)
        widget._max_tokens.setValue(args.max_tokens)
        if args.region is not None:
            x, y, w, h = args.region
            shapes = widget._on_new_regions_layer()  # its data coordinates are level-0 px
            shapes.add_rectangles(np.array([[y, x], [y + h, x + w]], dtype=float))
            shapes.selected_data = {0}
            shapes.mode = "pan_zoom"
            widget._scope.setCurrentText("selected shapes")
        _settle(app)
        widget._ask_btn.click()
        if widget._worker is None:
            logger.error("the question was not started: %s", widget._status.text() or "see the notification")
            return 1
        _wait(app, lambda: widget._worker is None, args.timeout, "answer")
        if not widget.history:
            logger.error("no answer: %s", widget._status.text())
            return 1
        _wait(app, lambda: not widget._top.loading, 60.0, "thumbnails")
        answer = widget.history[-1].answer
        logger.info("answer (%s, %s): %s", answer.model, answer.scope, answer.answer)
        for t in widget._top.tiles:
            logger.info("top evidence %s: tile %d at level-0 %s", t.label, t.tile_index, t.xy)
        viewer.reset_view()
        if args.focus and widget._top.count():
            widget._top.itemClicked.emit(widget._top.item(0))
        _settle(app, 2.0)
        canvas = viewer.screenshot(canvas_only=True, flash=False)
        with atomic_path(args.canvas) as tmp:
            Image.fromarray(np.asarray(canvas)).save(tmp, format="PNG")
        with atomic_path(args.dock) as tmp:
            if not widget.grab().save(str(tmp), "PNG"):
                raise OSError(f"{args.dock}: Qt could not write the dock's PNG")
        logger.info("wrote %s (canvas) and %s (dock)", args.canvas, args.dock)
        return 0
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from wsi_llava.errors import WsiLlavaError

    try:
        return run(args)
    except (WsiLlavaError, OSError, TimeoutError) as e:
        logger.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
