"""npe2 reader: whole-slide images as lazy multiscale RGB layers in µm, QuPath GeoJSON as Shapes.

Pixels are never read up front: each pyramid level is a dask array over the tifffile zarr store, or
(for OpenSlide-only formats) over ``read_region`` calls, one per chunk, so napari reads only what
it shows. Unreadable files become a notification naming the problem, not a traceback.

The slide stays open while a layer shows it: the layer's metadata names its handle, and the file is
closed when the last layer with that handle leaves a watched viewer (``Viewer.close`` removes them all),
or at exit for a layer that never reached one.
"""

from __future__ import annotations

import atexit
import logging
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_wsi_llava._shapes import META_KEY, layer_kwargs, regions_to_shapes
from wsi_llava.errors import SlideError, WsiLlavaError

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".ome.tif", ".ome.tiff")
GEOJSON_SUFFIXES = (".geojson",)
#: dask chunk edge (pixels) of the OpenSlide-backed levels
CHUNK = 1024

LayerData = tuple[Any, ...]

#: open slide readers behind the layers this plugin made, by the handle in their metadata
_open_slides: dict[str, Any] = {}
#: layer lists whose removals close slides
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The reader function for ``path`` by suffix, or None so napari tries other plugins."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    name = str(path).lower()
    if name.endswith(GEOJSON_SUFFIXES):
        return read_geojson_layers
    if name.endswith(SLIDE_SUFFIXES):
        return read_slide_layers
    return None


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def read_slide_layers(path: str | list[str]) -> list[LayerData]:
    """napari reader: one multiscale RGB image layer; ``[(None,)]`` plus a notification on bad files."""
    path = path[0] if isinstance(path, list) else path
    try:
        return [slide_layer_data(path)]
    except WsiLlavaError as e:
        _notify_error(str(e))
        return [(None,)]


def read_geojson_layers(path: str | list[str]) -> list[LayerData]:
    """napari reader: QuPath GeoJSON annotations as one Shapes layer (names, descriptions kept)."""
    path = path[0] if isinstance(path, list) else path
    try:
        return [geojson_layer_data(path, *_current_image_transform())]
    except WsiLlavaError as e:
        _notify_error(str(e))
        return [(None,)]


def _current_image_transform() -> tuple[tuple[float, float], tuple[float, float], tuple[str, str] | None]:
    """Scale/translate of the slide open in the current viewer, so imported shapes land on it."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt / no viewer: plain level-0 pixels
        viewer = None
    if viewer is not None:
        for layer in reversed(list(viewer.layers)):
            if layer.__class__.__name__ == "Image" and slide_info(layer) is not None:
                units = tuple(str(u) for u in layer.units[-2:])
                return tuple(layer.scale[-2:]), tuple(layer.translate[-2:]), units
    return (1.0, 1.0), (0.0, 0.0), None


# --- open slide files -----------------------------------------------------------------------------
def slide_info(layer: Any) -> dict[str, Any] | None:
    """What :func:`slide_layer_data` recorded on a slide layer (path, µm/px, dimensions, handle), else None.

    Other layers of this plugin (regions, the evidence heat map) carry other ``wsi_llava`` metadata.
    """
    info = getattr(layer, "metadata", {}).get(META_KEY)
    return info if isinstance(info, dict) and "path" in info and "dimensions" in info else None


def slide_handle(layer: Any) -> str | None:
    """The handle of the open slide behind ``layer``, or None for any other layer."""
    info = slide_info(layer)
    return info.get("handle") if info is not None else None


def watch_viewer(viewer: Any) -> None:
    """Close a slide's file when the last layer showing it leaves ``viewer`` (once per viewer)."""
    layers = viewer.layers
    if layers not in _watched:
        _watched.add(layers)
        layers.events.removed.connect(_on_layer_removed)


def _watch_current_viewer() -> None:
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt / no viewer: closed at exit
        viewer = None
    if viewer is not None:
        watch_viewer(viewer)


def _on_layer_removed(event: Any) -> None:
    handle = slide_handle(event.value)
    if handle is None or any(slide_handle(lyr) == handle for layers in list(_watched) for lyr in layers):
        return  # not a slide layer, or another layer (a duplicate) still shows it
    close_slide(handle)


def close_slide(handle: str) -> None:
    """Close the slide file behind ``handle`` (a no-op when it is already closed)."""
    reader = _open_slides.pop(handle, None)
    if reader is not None:
        reader.close()
        logger.debug("closed %s", reader.path)


@atexit.register
def close_all_slides() -> None:
    """Close every slide file still open (at exit: layers that never reached a watched viewer)."""
    for handle in list(_open_slides):
        close_slide(handle)


# --- slides ---------------------------------------------------------------------------------------
def _squeeze_to_rgb(arr: Any, axes: str) -> Any:
    """A dask array ``(h, w, c)`` from a tifffile level array with axes ``axes`` (singletons dropped)."""
    import dask.array as da

    want = 2 if axes == "YX" else 3
    while arr.ndim > want:
        ones = [i for i, n in enumerate(arr.shape[: arr.ndim - want]) if n == 1]
        if not ones:
            raise SlideError(f"cannot display an image of shape {arr.shape} (axes {axes})")
        arr = arr[(slice(None),) * ones[0] + (0,)]
    if axes in ("SYX", "CYX"):
        arr = da.moveaxis(arr, 0, -1)
    elif axes == "YX":
        arr = da.stack([arr, arr, arr], axis=-1)
    return arr


def _openslide_level(reader: Any, level: int) -> Any:
    """A lazy dask array of one level whose chunks each call ``reader.read_region``."""
    import dask.array as da

    w, h = reader.level_dimensions[level]
    ds = float(reader.level_downsamples[level])
    chunks = (_chunk_sizes(h), _chunk_sizes(w), (3,))

    def block(block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        loc = (round(x0 * ds), round(y0 * ds))
        return reader.read_region(loc, level, (x1 - x0, y1 - y0))

    return da.map_blocks(block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))


def _chunk_sizes(n: int) -> tuple[int, ...]:
    full, rest = divmod(n, CHUNK)
    return (CHUNK,) * full + ((rest,) if rest else ())


def slide_pyramid(reader: Any) -> list[Any]:
    """Every level of an open slide as a lazy dask array ``(h, w, 3|4)`` uint8, largest first."""
    import dask.array as da

    if hasattr(reader, "level_arrays"):
        levels = []
        for arr in reader.level_arrays():
            d = da.from_zarr(arr)
            levels.append(_squeeze_to_rgb(d, reader.axes))
        return [lv.rechunk({0: CHUNK, 1: CHUNK}) for lv in levels]
    return [_openslide_level(reader, i) for i in range(len(reader.level_dimensions))]


def slide_layer_data(path: str | Path, mpp: float | None = None) -> LayerData:
    """The layer data tuple of a slide: multiscale, RGB, scale in µm/px (pixels when µm/px is unknown).

    The slide stays open for the layer's pixels; see :func:`watch_viewer` for when it closes.
    """
    from wsi_llava.slide import open_slide

    path = Path(path)
    reader = open_slide(path, mpp=mpp)
    try:
        data, kwargs = _slide_layer(path, reader)
    except BaseException:
        reader.close()
        raise
    handle = uuid.uuid4().hex
    _open_slides[handle] = reader
    kwargs["metadata"][META_KEY]["handle"] = handle
    _watch_current_viewer()
    return (data, kwargs, "image")


def _slide_layer(path: Path, reader: Any) -> tuple[Any, dict[str, Any]]:
    from napari.utils.notifications import show_warning

    try:
        slide_mpp: float | None = reader.mpp
        mpp_problem = None
    except SlideError:
        slide_mpp = None
        mpp_problem = reader.mpp_problem() or "the file's µm/px cannot be used"
        show_warning(
            f"{path}: {mpp_problem}; the scale bar shows pixels. "
            "Enter the slide's µm/px in the WSI-LLaVA widget before asking."
        )
    levels = slide_pyramid(reader)
    scale = (slide_mpp, slide_mpp) if slide_mpp else (1.0, 1.0)
    units = ("micrometer", "micrometer") if slide_mpp else ("pixel", "pixel")
    w, h = reader.dimensions
    kwargs = {
        "name": path.name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "contrast_limits": [0, 255],
        "scale": scale,
        "units": units,
        "metadata": {
            META_KEY: {
                "path": str(path.resolve()),
                "mpp": slide_mpp,
                "mpp_problem": mpp_problem,  # why the file's µm/px is not used (the core's words)
                "reader": reader.reader_name,
                "dimensions": [int(w), int(h)],
                "level_dimensions": [list(d) for d in reader.level_dimensions],
            }
        },
    }
    return (levels if len(levels) > 1 else levels[0]), kwargs


# --- annotations ----------------------------------------------------------------------------------
def geojson_layer_data(
    path: str | Path,
    image_scale: tuple[float, float] = (1.0, 1.0),
    image_translate: tuple[float, float] = (0.0, 0.0),
    units: tuple[str, str] | None = None,
) -> LayerData:
    """QuPath GeoJSON polygons as a Shapes layer over a slide with the given scale/translate."""
    from wsi_llava.slide.geojson import read_geojson

    path = Path(path)
    regions = read_geojson(path, skip_unsupported=True)
    data, types, features = regions_to_shapes(regions, image_scale, image_translate)
    extent = max((max(r.bounds[2] - r.bounds[0], r.bounds[3] - r.bounds[1]) for r in regions), default=2048.0)
    kwargs = layer_kwargs(
        path.stem, features, image_scale, image_translate, types, extent=extent * 4, units=units
    )
    kwargs["metadata"][META_KEY]["source_file"] = str(path.resolve())
    return (data, kwargs, "shapes")
