"""Tile packs: the tiles of annotated regions, paired with each region's description, for tile-text alignment.

``wsi-llava train prepare-tiles`` reads every open-ended region question of the benches, finds the
tissue tiles of the region (the whole annotated polygon when the bench folder has
``annotations/<slide>.geojson`` holding the question's ``annotation_id``, else the question's box),
resizes them to the tile encoder's input and stores them JPEG-compressed with the answer text and its
frozen text embedding. A pack is small enough to move to a GPU machine; the slides and the text model
stay where they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_llava.progress import ProgressCallback, no_progress
from wsi_llava.train.config import TrainError
from wsi_llava.train.data import read_pack, save_pack

logger = logging.getLogger(__name__)

TILE_PACK_VERSION = 1


@dataclass(frozen=True)
class _Job:
    slide_key: str
    path: Path
    annotations: Path | None
    items: list[Any]


def _encoder_input(name: str) -> tuple[int, int]:
    """``(resize_size, input_size)`` of a registered tile encoder, without building it."""
    from wsi_llava import plugins

    registry = plugins.tile_encoders()
    if name not in registry:
        raise TrainError(f"unknown tile encoder {name!r}; registered: {', '.join(sorted(registry))}")
    meta = registry[name].meta
    size = int(meta.get("input_size", 224))
    return int(meta.get("resize_size") or size), size


def _jobs(benches: Iterable[str | Path], tasks: set[str] | None) -> list[_Job]:
    from wsi_llava.eval.bench import load_bench

    jobs: list[_Job] = []
    missing: list[str] = []
    for b in benches:
        try:
            bench = load_bench(b)
        except Exception as e:  # noqa: BLE001 - the loader's message names the file
            raise TrainError(str(e)) from None
        root = bench.root or Path(b)
        by_image: dict[str, list[Any]] = {}
        for it in bench.items:
            if it.region is None or it.kind != "open" or (tasks is not None and it.task not in tasks):
                continue
            by_image.setdefault(it.image, []).append(it)
        for image, items in sorted(by_image.items()):
            path = root / image
            if not path.exists():
                missing.append(str(path))
            ann = root / "annotations" / f"{Path(image).stem}.geojson"
            jobs.append(
                _Job(f"{Path(b).name}/{Path(image).stem}", path, ann if ann.is_file() else None, items)
            )
    if missing:
        shown = "\n  ".join(missing[:20]) + (
            f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        )
        raise TrainError(f"{len(missing)} slide(s) named by the bench are missing:\n  {shown}")
    if not jobs:
        raise TrainError("no open-ended region questions in the benches: nothing to pair tiles with")
    return jobs


def prepare_tile_pack(
    benches: Iterable[str | Path],
    out: str | Path,
    *,
    tile_encoder: str = "demo-vit",
    target_mpp: float = 0.5,
    tile_size: int = 256,
    tasks: Iterable[str] | None = None,
    use_annotations: bool = True,
    max_tiles_per_region: int = 48,
    jpeg_quality: int = 92,
    text_encoder: str | None = "minilm",
    text_max_length: int = 128,
    seed: int = 0,
    progress: ProgressCallback = no_progress,
) -> Path:
    """Write a tile pack of every open-ended region question of ``benches`` (missing slides listed first)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    from wsi_llava.errors import RegionError
    from wsi_llava.slide import open_slide
    from wsi_llava.slide.geojson import read_geojson
    from wsi_llava.slide.region import Region
    from wsi_llava.slide.tiling import make_tile_grid, read_tiles, select_tiles

    resize, size = _encoder_input(tile_encoder)
    jobs = _jobs(benches, set(tasks) if tasks is not None else None)
    rng = np.random.default_rng(seed)
    texts: dict[str, int] = {}
    items: list[dict[str, Any]] = []
    jpegs: list[Any] = []
    skipped: list[str] = []
    for j, job in enumerate(jobs):
        progress(j, len(jobs), "reading region tiles")
        polygons = {}
        if use_annotations and job.annotations is not None:
            polygons = {r.id: r for r in read_geojson(job.annotations, skip_unsupported=True) if r.id}
        reader = open_slide(job.path)
        try:
            grid = make_tile_grid(reader, target_mpp=target_mpp, tile_size=tile_size)
            seen: set[tuple[str, str]] = set()
            for it in job.items:
                region = polygons.get(it.annotation_id or "")
                if region is None:
                    r = it.region
                    region = Region.rectangle(r.x, r.y, r.w, r.h, id=it.annotation_id)
                key = (region.id or f"{it.region.x},{it.region.y}", it.answer)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    idx = select_tiles(grid, region, source=it.source)
                except RegionError as e:
                    skipped.append(str(e))
                    continue
                if len(idx) > max_tiles_per_region:
                    idx = np.sort(rng.choice(idx, max_tiles_per_region, replace=False))
                tiles = torch.from_numpy(read_tiles(reader, grid, idx)).permute(0, 3, 1, 2).float()
                if tiles.shape[-1] != resize:
                    tiles = F.interpolate(tiles, size=(resize, resize), mode="bicubic", antialias=True)
                top = (resize - size) // 2
                tiles = tiles[..., top : top + size, top : top + size].clamp_(0, 255).round_().to(torch.uint8)
                tid = texts.setdefault(it.answer, len(texts))
                for t, tile_index in zip(tiles, idx, strict=True):
                    jpegs.append(encode_jpeg(t.contiguous(), quality=jpeg_quality))
                    items.append(
                        {"slide": job.slide_key, "region": key[0], "tile": int(tile_index), "text": tid}
                    )
        finally:
            reader.close()
    progress(len(jobs), len(jobs), "reading region tiles")
    if skipped:
        logger.warning("%d region(s) skipped (no tissue tiles), e.g. %s", len(skipped), skipped[0])
    if not items:
        raise TrainError("no tissue tiles in any region of the benches")
    text_features = None
    if text_encoder is not None:
        from wsi_llava.train.stage1 import TextEncoder, resolve_text_encoder

        enc = TextEncoder(resolve_text_encoder(text_encoder), text_max_length).eval()
        names = list(texts)
        with torch.no_grad():
            text_features = torch.cat([enc(names[i : i + 64]) for i in range(0, len(names), 64)]).float()
    out = Path(out)
    payload = {
        "text_encoder": {"name": text_encoder, "max_length": text_max_length} if text_encoder else None,
        "text_features": text_features,
        "version": TILE_PACK_VERSION,
        "tile_encoder": tile_encoder,
        "input_size": size,
        "target_mpp": target_mpp,
        "tile_size": tile_size,
        "texts": list(texts),
        "items": items,
        "jpegs": jpegs,
    }
    save_pack(payload, out)
    logger.info("wrote %s: %d tiles of %d regions, %d descriptions", out, len(items), len(jobs), len(texts))
    return out


@dataclass
class TileTextData:
    """Decoded tiles ``(N, 3, s, s)`` uint8 with their slide keys and description ids."""

    tiles: Any
    slides: list[str]
    text_ids: list[int]
    texts: list[str]
    tile_encoder: str
    text_features: Any = None  # (len(texts), D) frozen embeddings, when every pack has them
    text_encoder: dict[str, Any] | None = None  # {"name", "max_length"} they were made with


def load_tile_packs(paths: Iterable[Path]) -> TileTextData:
    """Read and decode tile packs (they must share the tile encoder and its input size)."""
    import torch
    from torchvision.io import decode_jpeg

    paths = list(paths)
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise TrainError(
            "tile pack(s) not found (make them with `wsi-llava train prepare-tiles`): " + ", ".join(missing)
        )
    texts: dict[str, int] = {}
    chunks, slides, text_ids = [], [], []
    encoders: set[tuple[str, int]] = set()
    text_encoders: list[Any] = []
    feats: dict[int, Any] = {}
    for p in paths:
        pack = read_pack(p, TILE_PACK_VERSION, "tile pack")
        encoders.add((str(pack["tile_encoder"]), int(pack["input_size"])))
        remap = [texts.setdefault(t, len(texts)) for t in pack["texts"]]
        text_encoders.append(pack.get("text_encoder"))
        if pack.get("text_features") is not None:
            for j, t in enumerate(remap):
                feats[t] = pack["text_features"][j]
        decoded = decode_jpeg(list(pack["jpegs"]))
        chunks.append(torch.stack(decoded))
        slides += [f"{p.stem}/{it['slide']}" for it in pack["items"]]
        text_ids += [remap[it["text"]] for it in pack["items"]]
    if len(encoders) > 1:
        raise TrainError(f"tile packs were made for different encoders / input sizes: {sorted(encoders)}")
    same_text = text_encoders[0] is not None and all(t == text_encoders[0] for t in text_encoders)
    return TileTextData(
        text_features=torch.stack([feats[i] for i in range(len(texts))]) if same_text else None,
        text_encoder=text_encoders[0] if same_text else None,
        tiles=torch.cat(chunks),
        slides=slides,
        text_ids=text_ids,
        texts=list(texts),
        tile_encoder=next(iter(encoders))[0],
    )
