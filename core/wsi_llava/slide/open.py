"""``open_slide``: pick a slide reader from the plugin registry by file suffix and priority.

A reader's ``meta["suffixes"]`` lists the suffixes it handles (``"*"`` matches any file) and
``meta["priority"]`` orders candidates, highest first: a number, or a mapping from suffix to number
with an optional ``"*"`` default (so one reader can be first for ``.svs`` but second for ``.tif``).
Readers that raise are skipped; if none can open the file, one ``SlideError`` summarises why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wsi_llava.errors import SlideError
from wsi_llava.slide.base import BaseSlideReader, check_mpp_override

logger = logging.getLogger(__name__)


def _matching_suffix(name: str, suffixes: Any) -> str | None:
    """The longest suffix in ``suffixes`` that ``name`` ends with ("*" if only the wildcard matches)."""
    best: str | None = None
    for s in suffixes or ():
        s = str(s).lower()
        if s == "*":
            best = best or "*"
        elif name.endswith(s) and (best in (None, "*") or len(s) > len(best)):
            best = s
    return best


def _priority(meta: dict[str, Any], suffix: str) -> float:
    p = meta.get("priority", 0)
    if isinstance(p, dict):
        return float(p.get(suffix, p.get("*", 0)))
    return float(p)


def _reason(err: BaseException, path: Path) -> str:
    msg = str(err)
    prefix = f"{path}: "
    return msg[len(prefix) :] if msg.startswith(prefix) else msg


def candidate_readers(path: str | Path) -> list[str]:
    """Names of the registered readers that claim ``path``, best first."""
    from wsi_llava.plugins import slide_readers

    name = Path(path).name.lower()
    scored = []
    for i, (reader_name, entry) in enumerate(slide_readers().items()):
        suffix = _matching_suffix(name, entry.meta.get("suffixes", ()))
        if suffix is not None:
            scored.append((-_priority(entry.meta, suffix), i, reader_name))
    return [n for _, _, n in sorted(scored)]


def open_slide(path: str | Path, mpp: float | None = None, reader: str | None = None) -> BaseSlideReader:
    """Open a whole-slide image; ``mpp`` overrides the file's µm/px, ``reader`` forces a backend."""
    from wsi_llava.plugins import slide_readers

    path = Path(path)
    mpp = check_mpp_override(mpp, path, warn=False)  # refused here, before any reader is tried
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    registry = slide_readers()
    if reader is not None:
        if reader not in registry:
            raise SlideError(
                f"{path}: unknown slide reader {reader!r}; available: {', '.join(sorted(registry))}"
            )
        names = [reader]
    else:
        names = candidate_readers(path)
        if path.is_dir():
            names = [n for n in names if registry[n].meta.get("accepts_directories")]
            if not names:
                raise SlideError(f"{path}: is a directory, not a slide file")
        if not names:
            known = " ".join(
                sorted({s for e in registry.values() for s in e.meta.get("suffixes", ()) if s != "*"})
            )
            what = f"{''.join(path.suffixes)!r} files" if path.suffix else "files without a suffix"
            raise SlideError(f"{path}: no slide reader handles {what}; supported: {known}")
    reasons = []
    for name in names:
        try:
            slide = registry[name].fn(path, mpp)
            w, h = slide.dimensions
            if w < 1 or h < 1:
                slide.close()
                raise SlideError(f"{path}: the slide has no pixels ({w}x{h})")
        except Exception as e:  # a reader that cannot open the file; try the next one
            logger.debug("reader %s cannot open %s: %s", name, path, e)
            reason = _reason(e, path) if isinstance(e, SlideError) else f"{type(e).__name__}: {e}"
            reasons.append(f"{name}: {reason}")
            continue
        logger.debug("opened %s with %s", path, name)
        return slide
    raise SlideError(f"{path}: unsupported format or corrupt file ({'; '.join(reasons)})")
