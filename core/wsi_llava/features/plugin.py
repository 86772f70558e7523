"""Built-in tile encoders, registered through the ``register_tile_encoders`` hook (no torch/timm import here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_llava.hookspecs import hookimpl

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _builder(name: str):
    def build(weights: Path | None = None) -> Any:
        from wsi_llava.features import tile

        return tile.build_timm_module(name, weights)

    build.__name__ = f"build_{name.replace('-', '_')}"
    return build


@hookimpl
def register_tile_encoders(register):
    register(
        "prov-gigapath",
        _builder("prov-gigapath"),
        embed_dim=1536,
        input_size=224,
        resize_size=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="Prov-GigaPath tile encoder (DINOv2 ViT-g, patch 16, 1.13 B parameters, 1536-d); "
        "weights: the hub's pytorch_model.bin",
    )
    register(
        "uni",
        _builder("uni"),
        embed_dim=1024,
        input_size=224,
        resize_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="UNI tile encoder (ViT-L/16, 303 M parameters, 1024-d); weights: the hub's pytorch_model.bin",
    )
    register(
        "demo-vit",
        _builder("demo-vit"),
        embed_dim=192,
        input_size=112,
        resize_size=112,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="small ViT (112 px, patch 16, 192-d, 4 layers) for the embedded demo; fast on CPU",
    )
