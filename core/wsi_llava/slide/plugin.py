"""Built-in slide readers, registered through the same ``register_slide_readers`` hook as plugins.

Nothing heavy is imported here: openslide and tifffile load only when a slide is opened.
"""

from __future__ import annotations

from pathlib import Path

from wsi_llava.hookspecs import hookimpl
from wsi_llava.slide.base import BaseSlideReader

TIFFFILE_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf2", ".tf8", ".svs")
OPENSLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".tif",
    ".tiff",
    ".dcm",
)


def open_tifffile(path: Path, mpp: float | None) -> BaseSlideReader:
    """Open with tifffile + zarr (OME-TIFF, pyramids as pages or SubIFDs)."""
    from wsi_llava.slide.tiff_reader import TiffReader

    return TiffReader(path, mpp=mpp)


def open_openslide(path: Path, mpp: float | None) -> BaseSlideReader:
    """Open with OpenSlide (vendor formats)."""
    from wsi_llava.slide.openslide_reader import OpenSlideReader

    return OpenSlideReader(path, mpp=mpp)


@hookimpl
def register_slide_readers(register):
    # tifffile first for plain TIFFs (it sees SubIFD pyramids that OpenSlide reads as one level);
    # OpenSlide first for vendor formats, and the fallback for TIFFs tifffile cannot read.
    register(
        "tifffile",
        open_tifffile,
        suffixes=TIFFFILE_SUFFIXES,
        priority={"*": 20, ".svs": 5},  # for .svs only a fallback when OpenSlide fails
        description="tifffile + zarr: OME-TIFF, pyramidal TIFF (pages or SubIFDs), SVS",
    )
    register(
        "openslide",
        open_openslide,
        suffixes=OPENSLIDE_SUFFIXES,
        priority={"*": 30, ".tif": 10, ".tiff": 10},
        description="OpenSlide: Aperio, Hamamatsu, MIRAX, Leica, Ventana, Philips, DICOM, generic TIFF",
    )
