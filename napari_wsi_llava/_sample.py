"""npe2 sample data: the synthetic demo slide (generated once into the cache) and its annotations."""

from __future__ import annotations

from typing import Any

from napari_wsi_llava._reader import geojson_layer_data, slide_layer_data


def demo_slide() -> list[tuple[Any, ...]]:
    """The WSI-LLaVA demo slide as a multiscale image, plus its ground-truth regions as Shapes."""
    from wsi_llava.demo import demo_world
    from wsi_llava.synth import load_manifest

    folder = demo_world()
    slide = load_manifest(folder).slides[0]
    image = slide_layer_data(folder / slide.path)
    layers = [image]
    annotations = folder / slide.annotations
    if annotations.is_file():
        scale = image[1]["scale"]
        data, kwargs, kind = geojson_layer_data(annotations, scale, (0.0, 0.0), image[1]["units"])
        kwargs["name"] = "demo regions"
        kwargs["visible"] = True
        layers.append((data, kwargs, kind))
    return layers
