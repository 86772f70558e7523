"""``OpenSlideReader``: vendor formats (Aperio, Hamamatsu, MIRAX, Leica, Ventana, DICOM...) via OpenSlide."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wsi_llava.errors import SlideError
from wsi_llava.slide.base import StoredLevelsReader

logger = logging.getLogger(__name__)


def rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 image onto white (OpenSlide marks pixels outside the scan transparent)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class OpenSlideReader(StoredLevelsReader):
    """A slide read through openslide-python (libopenslide from openslide-bin)."""

    reader_name = "openslide"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        import openslide

        self._errors = (openslide.OpenSlideError, OSError, ValueError)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{self.path}: OpenSlide does not recognise this file format") from None
        except self._errors as e:
            raise SlideError(f"{self.path}: OpenSlide cannot open the file: {e}") from None
        self._set_levels(self._slide.level_dimensions, self._slide.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's property map (vendor metadata)."""
        return dict(self._slide.properties)

    def _native_mpp(self) -> float | None:
        props = self._slide.properties
        try:
            mx = float(props["openslide.mpp-x"])
        except (KeyError, ValueError):
            return None
        try:
            my = float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            my = mx
        if mx > 0 and my > 0 and abs(mx - my) / max(mx, my) > 0.05:
            logger.warning("%s: µm/px differs between x (%g) and y (%g); using x", self.path, mx, my)
        return mx

    def _mpp_source(self) -> str:
        return "OpenSlide's openslide.mpp-x property"

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            img = self._slide.read_region(location, level, size)
        except self._errors as e:
            raise SlideError(
                f"{self.path}: OpenSlide cannot read region {location} {size} at level {level}: {e}"
            ) from None
        return rgba_to_rgb_white(np.asarray(img))

    def close(self) -> None:
        self._slide.close()
