"""Tile feature extraction: read tissue tiles in batches, encode them, and fill the feature cache once."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np

from wsi_llava.encoders.cache import CachedFeatures, CacheError, CacheKey, FeatureCache, grid_hash
from wsi_llava.errors import ModelError, WsiLlavaError
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

MESSAGE = "extracting features"


def cache_key_for(reader: Any, grid: Any, encoder: Any) -> CacheKey:
    """The cache key of ``grid``'s tiles of the slide ``reader`` encoded by ``encoder``."""
    return CacheKey(
        slide_fingerprint=reader.fingerprint(),
        encoder_id=encoder.encoder_id,
        tile_size=int(grid.tile_size),
        target_mpp=float(grid.target_mpp),
        grid_hash=grid_hash(grid.coords),
    )


def _check_encoder(encoder: Any) -> None:
    for attr in ("preprocess", "encoder_id", "embed_dim"):
        if not hasattr(encoder, attr):
            raise ModelError(
                f"tile encoder {type(encoder).__name__} lacks {attr!r}: build it with "
                "wsi_llava.encoders.tile.build_tile_encoder(name, weights)"
            )


def extract_features(
    reader: Any,
    grid: Any,
    encoder: Any,
    cache: FeatureCache,
    *,
    device: Any = "cpu",
    batch_size: int = 64,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    workers: int = 2,
) -> CachedFeatures:
    """Features of every tile of ``grid``: from ``cache`` when present, else encoded now and cached.

    Runs under ``torch.inference_mode()`` (bf16 autocast on CUDA). ``cancel`` is checked between batches
    and raises ``Cancelled``; an interrupted run leaves no cache entry.
    """
    import torch

    from wsi_llava.slide.tiling import iter_tile_batches

    _check_encoder(encoder)
    progress = progress or no_progress
    key = cache_key_for(reader, grid, encoder)
    n = len(grid.coords)
    hit = cache.get(key)
    if hit is not None:
        logger.info("%s: %d tile features from the cache (%s)", reader.path, hit.n_tiles, hit.path)
        progress(hit.n_tiles, hit.n_tiles, "features from cache")
        return hit
    if n == 0:
        raise WsiLlavaError(f"{reader.path}: no tissue tiles to encode")
    if not getattr(encoder, "trained", True):
        logger.warning("%s: encoding with an untrained (randomly initialised) tile encoder", reader.path)
    dev = torch.device(device)
    encoder.to(dev).eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    )
    attrs = {
        "encoder_name": getattr(encoder, "name", None),
        "weights_sha256": getattr(encoder, "weights_sha256", None),
        "trained": bool(getattr(encoder, "trained", True)),
        "tile_size_level0": int(grid.tile_size_level0),
        "slide_path": str(reader.path),
    }
    done = 0
    progress(0, n, MESSAGE)
    with cache.write(key, n, int(encoder.embed_dim), attrs=attrs) as writer:
        writer.write_coords(grid.coords)
        with torch.inference_mode(), autocast:
            for idx, tiles in iter_tile_batches(
                reader, grid, indices=None, batch_size=batch_size, workers=workers, cancel=cancel
            ):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                feats = encoder(encoder.preprocess(tiles)).float().cpu().numpy()
                if not np.isfinite(feats).all():
                    raise ModelError(
                        f"{reader.path}: tile encoder {encoder.encoder_id} produced non-finite features"
                    )
                writer.write(idx, feats)
                done += len(idx)
                progress(done, n, MESSAGE)
        if cancel is not None:
            cancel.raise_if_cancelled()
    out = cache.get(key)
    if out is None:  # pragma: no cover - the writer just completed this group
        raise CacheError(f"{cache.path_for(key)}: feature cache written but not readable")
    return out
