"""The ``SlideReader`` contract every slide backend fulfils, and shared behaviour for backends.

All coordinates are level-0 pixels ``(x, y)``; images are RGB ``uint8`` arrays of shape ``(h, w, 3)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from wsi_llava.errors import RegionError, SlideError

logger = logging.getLogger(__name__)

#: µm/px a slide scan plausibly has (a 100x oil objective ~0.05, a 1.25x overview ~8): a value read from a
#: file outside this range comes from wrong metadata (e.g. a 72-dpi screen default) and is refused
PLAUSIBLE_MPP = (0.05, 50.0)
#: the range an explicit ``--mpp`` may give (a warning outside the plausible range, refused beyond this)
HARD_MPP = (0.001, 1000.0)


def native_mpp_problem(native: float | None, source: Callable[[], str]) -> str | None:
    """What is wrong with the µm/px a file records (``native``; ``source()`` names where it was read), or
    None when it is a plausible slide scan's."""
    if native is None or not (native > 0 and math.isfinite(native)):
        return "the file records no microns per pixel (µm/px)"
    lo, hi = PLAUSIBLE_MPP
    if not lo <= native <= hi:
        return (
            f"{native:.4g} µm/px read from {source()} is outside the {lo:g}–{hi:g} µm/px of a slide scan "
            "(wrong metadata?)"
        )
    return None


def check_mpp_override(mpp: object, path: str | Path, warn: bool = True) -> float | None:
    """The µm/px the user gave (``--mpp``) as a float, refused unless positive, finite and within ``HARD_MPP``.

    Outside ``PLAUSIBLE_MPP`` it is used as given with a warning (the user insists); None stays None.
    """
    if mpp is None:
        return None
    if isinstance(mpp, bool) or not isinstance(mpp, numbers.Real):
        raise SlideError(f"{path}: --mpp must be a positive number, got {mpp!r}")
    value = float(mpp)
    if not (value > 0 and math.isfinite(value)):
        raise SlideError(f"{path}: --mpp must be a positive number, got {mpp!r}")
    lo, hi = HARD_MPP
    if not lo <= value <= hi:
        raise SlideError(
            f"{path}: --mpp {value:g} µm/px is outside {lo:g}–{hi:g} µm/px, the widest range accepted "
            f"(slide scans have {PLAUSIBLE_MPP[0]:g}–{PLAUSIBLE_MPP[1]:g} µm/px)"
        )
    if warn and not PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:
        logger.warning(
            "%s: --mpp %g µm/px is outside the %g–%g µm/px of slide scans; using it as given",
            path,
            value,
            *PLAUSIBLE_MPP,
        )
    return value


@runtime_checkable
class SlideReader(Protocol):
    """What the core needs from a slide file, whatever library reads it."""

    path: Path
    reader_name: str

    @property
    def dimensions(self) -> tuple[int, int]: ...  # level-0 (width, height)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def mpp(self) -> float: ...  # µm per level-0 pixel; raises SlideError when unknown

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def thumbnail(self, max_size: int = 1024) -> np.ndarray: ...

    def fingerprint(self) -> str: ...

    def close(self) -> None: ...


class BaseSlideReader(ABC):
    """Shared logic: µm/px override, level choice, thumbnails, fingerprints, bounds checks.

    Subclasses implement ``_read(location, level, size)``, ``level_dimensions``,
    ``level_downsamples`` and ``_native_mpp``.
    """

    reader_name = "base"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._mpp_override = check_mpp_override(mpp, self.path)

    # --- implemented by backends -------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]: ...

    @abstractmethod
    def _native_mpp(self) -> float | None:
        """µm/px from the file's metadata, or None when the file has none."""

    def _mpp_source(self) -> str:
        """Where :meth:`_native_mpp` read its value (a tag, a property), for error messages."""
        return "the file's metadata"

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read RGB pixels; ``location`` is level-0, ``size`` is at ``level``."""

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release file handles."""

    # --- shared ----------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float:
        """µm per level-0 pixel: ``--mpp`` if given, else the file's, refused when missing or implausible."""
        if self._mpp_override is not None:
            return self._mpp_override
        native = self._native_mpp()
        problem = native_mpp_problem(native, self._mpp_source)
        if problem is not None:
            raise SlideError(f"{self.path}: {problem}; pass the slide's true µm/px, e.g. --mpp 0.5")
        return float(native)  # type: ignore[arg-type]

    def mpp_problem(self) -> str | None:
        """Why the file's own µm/px cannot be used (none recorded, or outside the plausible range), for a
        front end to say in its own words what to do; None when :attr:`mpp` is known."""
        if self._mpp_override is not None:
            return None
        return native_mpp_problem(self._native_mpp(), self._mpp_source)

    @property
    def has_mpp(self) -> bool:
        try:
            _ = self.mpp
        except SlideError:
            return False
        return True

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution level whose downsample does not exceed ``downsample`` (+1 %)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB pixels of a ``size`` (w, h) window at ``level`` whose top-left is level-0 ``location``.

        Parts outside the slide read as white, as OpenSlide does for transparent pixels.
        """
        if not 0 <= level < self.level_count:
            raise RegionError(f"{self.path}: level {level} does not exist (levels 0..{self.level_count - 1})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise RegionError(f"{self.path}: region size must be positive, got {w}x{h}")
        out = self._read((int(location[0]), int(location[1])), level, (w, h))
        if out.shape != (h, w, 3) or out.dtype != np.uint8:
            raise SlideError(
                f"{self.path}: reader returned {out.shape} {out.dtype}, expected ({h}, {w}, 3) uint8"
            )
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, downscaled so that its longer side is at most ``max_size`` pixels."""
        from PIL import Image

        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_size
        level = self.best_level_for_downsample(max(scale, 1.0))
        lw, lh = self.level_dimensions[level]
        img = self.read_region((0, 0), level, (lw, lh))
        tw, th = max(1, round(w0 / max(scale, 1.0))), max(1, round(h0 / max(scale, 1.0)))
        if (tw, th) != (lw, lh):
            # Pillow's box filter averages each output pixel's footprint: antialiased, no float copies
            img = np.array(Image.fromarray(img).resize((tw, th), Image.Resampling.BOX))
        return img

    def fingerprint(self) -> str:
        """A short id that changes when the file changes: size, modification time, head, tail, geometry.

        The modification time is what catches an in-place edit of the middle of the file, which reading
        only the first and last MB misses; hashing every byte would cost seconds per GB on every open.
        A copy that does not keep the time therefore gets its features extracted once more.
        """
        h = hashlib.sha256()
        st = self.path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        with open(self.path, "rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 1 << 20:
                f.seek(max(0, st.st_size - (1 << 20)))
                h.update(f.read(1 << 20))
        h.update(repr(self.level_dimensions).encode())
        return h.hexdigest()[:16]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dims={self.dimensions}, levels={self.level_count})"


class StoredLevelsReader(BaseSlideReader):
    """A backend that learns its pyramid once, on opening: :meth:`_set_levels` stores the level sizes
    (refusing a slide without pixels) and the two level properties serve them."""

    _level_dimensions: tuple[tuple[int, int], ...] = ()
    _level_downsamples: tuple[float, ...] = ()

    def _set_levels(
        self, dims: Sequence[tuple[int, int]], downsamples: Sequence[float] | None = None
    ) -> None:
        """Store the ``(width, height)`` of each level and its downsample (default: from the sizes)."""
        if not dims or min(dims[0]) < 1:
            raise SlideError(f"{self.path}: the slide has no pixels")
        self._level_dimensions = tuple((int(w), int(h)) for w, h in dims)
        w0, h0 = self._level_dimensions[0]
        if downsamples is None:
            downsamples = [(w0 / w + h0 / h) / 2.0 for w, h in self._level_dimensions]
        self._level_downsamples = tuple(float(d) for d in downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples
