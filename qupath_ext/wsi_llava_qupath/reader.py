"""A slide reader for the image open in QuPath, for when its file is not reachable from here.

The core opens slides by path and suffix, so the bridge writes a small pointer file
(``*.qupath-image``: gateway port and the QuPath server path, no secrets) and registers a reader for
that suffix. The reader asks QuPath for pixels over the gateway (``getImageBase64``, PNG, level-0
coordinates); the auth token, if any, comes from the live connection in this process or from
``$WSI_LLAVA_QUPATH_TOKEN``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_llava.errors import SlideError
from wsi_llava.slide.base import BaseSlideReader, StoredLevelsReader

POINTER_SUFFIX = ".qupath-image"
TOKEN_ENV = "WSI_LLAVA_QUPATH_TOKEN"

#: live bridges of this process, by port, so a pointer file reuses the connection that wrote it
_LIVE: dict[int, Any] = {}


def write_pointer(bridge: Any, directory: Path) -> Path:
    """Write the pointer file for the image open in QuPath; returns its path."""
    from wsi_llava_qupath.bridge import QuPathBridge

    assert isinstance(bridge, QuPathBridge)
    info = bridge.image_info()
    record = {
        "wsi_llava_qupath_image": 1,
        "port": bridge.port,
        "server_path": info.server_path,
        "width": info.width,
        "height": info.height,
    }
    directory.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    path = directory / f"{key}{POINTER_SUFFIX}"
    path.write_text(json.dumps(record), encoding="utf-8")
    _LIVE[bridge.port] = bridge
    return path


class QuPathImageReader(StoredLevelsReader):
    """Pixels of the image open in QuPath, read through its py4j gateway."""

    reader_name = "qupath"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            port = int(record["port"])
            self._server_path = str(record["server_path"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SlideError(f"{self.path}: not a wsi-llava QuPath image pointer ({e})") from None
        bridge = _LIVE.get(port)
        if bridge is None:
            from wsi_llava_qupath.bridge import connect

            bridge = connect(port, os.environ.get(TOKEN_ENV) or None)
        self.bridge = bridge
        info = bridge.image_info()
        if info.server_path != self._server_path:
            raise SlideError(
                f"{self.path}: QuPath now shows {info.server_path!r}, not {self._server_path!r}; "
                "open that image in QuPath again"
            )
        self.info = info
        dims = [(max(1, int(info.width / ds)), max(1, int(info.height / ds))) for ds in info.downsamples]
        self._set_levels(dims, info.downsamples)

    def _native_mpp(self) -> float | None:
        return self.info.mpp

    def _mpp_source(self) -> str:
        return "QuPath's pixel calibration"

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        w, h = size
        x, y = location
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image reads white, as in the other readers
        W, H = self.info.width, self.info.height
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + round(w * ds), W), min(y + round(h * ds), H)
        if x1 <= x0 or y1 <= y0:
            return out
        px = self.bridge.read_pixels(x0, y0, x1 - x0, y1 - y0, ds)
        ox, oy = round((x0 - x) / ds), round((y0 - y) / ds)
        ph, pw = min(px.shape[0], h - oy), min(px.shape[1], w - ox)
        out[oy : oy + ph, ox : ox + pw] = px[:ph, :pw]
        return out

    def fingerprint(self) -> str:
        """Same image in QuPath, same fingerprint (the pointer's port does not matter)."""
        key = json.dumps([self._server_path, list(self.level_dimensions), self.level_downsamples])
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def open_qupath_image(path: Path, mpp: float | None) -> BaseSlideReader:
    """``open_fn`` for the core's reader registry."""
    return QuPathImageReader(path, mpp=mpp)
