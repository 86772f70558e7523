"""User-facing errors: each one carries a message that names the file or field at fault.

The CLI prints these without a traceback and exits non-zero; frontends show them as notifications.
"""

from __future__ import annotations


class WsiLlavaError(Exception):
    """Base class for errors caused by user input (files, arguments, configuration)."""


class SlideError(WsiLlavaError):
    """A slide file cannot be opened or read (corrupt, unsupported, missing µm/px)."""


class RegionError(WsiLlavaError):
    """A region is empty, malformed, or lies outside the slide."""


class AnnotationError(WsiLlavaError):
    """A GeoJSON annotation file does not parse or lacks the requested annotation."""


class ModelError(WsiLlavaError):
    """A model, encoder or checkpoint cannot be found or has the wrong layout."""


class CacheError(WsiLlavaError):
    """A feature cache is unusable (incomplete, mismatched, unwritable)."""


class Cancelled(WsiLlavaError):
    """Long work was cancelled by the user; nothing partial was left behind."""
