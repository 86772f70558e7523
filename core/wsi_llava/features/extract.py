"""Tile feature extraction: read tissue tiles in batches, encode them, and fill the feature cache once."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_llava.errors import ModelError, WsiLlavaError
from wsi_llava.features.cache import (
    CachedFeatures,
    CacheError,
    CacheKey,
    CacheWriter,
    FeatureCache,
    grid_hash,
)
from wsi_llava.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

MESSAGE = "extracting features"


def cache_key_for(reader: Any, grid: Any, encoder: Any) -> CacheKey:
    """The cache key of ``grid``'s tiles of the slide ``reader`` encoded by ``encoder`` (or its id)."""
    return CacheKey(
        slide_fingerprint=reader.fingerprint(),
        encoder_id=encoder if isinstance(encoder, str) else encoder.encoder_id,
        tile_size=int(grid.tile_size),
        target_mpp=float(grid.target_mpp),
        grid_hash=grid_hash(grid.coords),
    )


def _check_encoder(encoder: Any) -> None:
    for attr in ("preprocess", "encoder_id", "embed_dim"):
        if not hasattr(encoder, attr):
            raise ModelError(
                f"tile encoder {type(encoder).__name__} lacks {attr!r}: build it with "
                "wsi_llava.features.tile.build_tile_encoder(name, weights)"
            )


def extract_features(
    reader: Any,
    grid: Any,
    encoder: Any,
    cache: FeatureCache,
    *,
    device: Any = "cpu",
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    workers: int = 2,
    fast: bool | None = None,
    compile: bool | None = None,
) -> CachedFeatures:
    """Features of every tile of ``grid``: from ``cache`` when present, else encoded now and cached.

    Runs under ``torch.inference_mode()`` (bf16 autocast on CUDA). ``cancel`` is checked between batches
    and raises ``Cancelled``; an interrupted run leaves no cache entry.

    ``fast`` (default: on for CUDA devices) runs the overlapped pipeline of
    :mod:`wsi_llava.features.fast_extract`: raw JPEG tiles decoded in batches on the device where the
    slide allows it, compiled encoder blocks, reading, decoding, encoding and writing at once.
    ``batch_size`` defaults to 256 on that path, 64 otherwise. ``compile``: None (default) compiles on
    CUDA in a background thread while the first batches run eagerly, so the first slide of a process
    does not wait for it; True compiles before the first batch (every batch through the same kernels:
    features reproducible run to run, as cohorts want); False never compiles.

    Several processes may extract the same slide into one cache: one encodes it while the others wait for
    the entry's lock (cancellably), then read its result. ``encoded`` on the result says which happened.
    """
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
    # One process encodes an entry; another extracting the same slide waits here, then reads its result.
    with cache.lock(
        key,
        what=f"the features of {reader.path}",
        cancel=cancel,
        on_wait=lambda: progress(0, n, "waiting for another process extracting this slide"),
    ):
        hit = cache.get(key)
        if hit is not None:
            logger.info("%s: %d tile features cached by another process", reader.path, hit.n_tiles)
            progress(hit.n_tiles, hit.n_tiles, "features from cache")
            return hit
        _encode_into(
            reader, grid, encoder, cache, key, device, batch_size, progress, cancel, workers, fast, compile
        )
        out = cache.get(key)
    if out is None:
        raise CacheError(f"{cache.path_for(key)}: feature cache written but not readable")
    out.encoded = True
    return out


def _encode_into(
    reader: Any,
    grid: Any,
    encoder: Any,
    cache: FeatureCache,
    key: CacheKey,
    device: Any,
    batch_size: int | None,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    workers: int,
    fast: bool | None,
    compile: bool | None,
) -> None:
    """Encode every tile of ``grid`` into the cache entry ``key`` (the caller holds its lock)."""
    import torch

    n = len(grid.coords)
    if not getattr(encoder, "trained", True):
        logger.warning("%s: encoding with an untrained (randomly initialised) tile encoder", reader.path)
    dev = torch.device(device)
    use_fast = dev.type == "cuda" if fast is None else bool(fast)
    if batch_size is None:
        batch_size = 256 if use_fast else 64
    encoder.to(dev).eval()
    attrs = {
        "encoder_name": getattr(encoder, "name", None),
        "weights_sha256": getattr(encoder, "weights_sha256", None),
        "trained": bool(getattr(encoder, "trained", True)),
        "tile_size_level0": int(grid.tile_size_level0),
        "slide_path": str(reader.path),
    }
    progress(0, n, MESSAGE)
    with cache.write(key, n, int(encoder.embed_dim), attrs=attrs) as writer:
        writer.write_coords(grid.coords)
        job = _Encoding(reader, grid, encoder, writer, dev, batch_size, workers, cancel, progress)
        if use_fast:
            _extract_fast(job, compile)
        else:
            _extract_reference(job)
        if cancel is not None:
            cancel.raise_if_cancelled()


@dataclass(frozen=True)
class _Encoding:
    """One slide's encoding as both pipelines see it: what to read, the encoder, where to write, how to
    report progress (tiles done of the grid's) and when to stop."""

    reader: Any
    grid: Any
    encoder: Any
    writer: CacheWriter
    dev: Any
    batch_size: int
    workers: int
    cancel: CancelToken | None
    progress: ProgressCallback


def _extract_reference(job: _Encoding) -> None:
    """The plain loop: ``iter_tile_batches`` -> eager encoder (bf16 autocast on CUDA) -> cache writer."""
    import torch

    from wsi_llava.slide.tiling import iter_tile_batches

    reader, encoder, cancel = job.reader, job.encoder, job.cancel
    n, done = len(job.grid.coords), 0
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if job.dev.type == "cuda" else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for idx, tiles in iter_tile_batches(
            reader, job.grid, indices=None, batch_size=job.batch_size, workers=job.workers, cancel=cancel
        ):
            if cancel is not None:
                cancel.raise_if_cancelled()
            feats = encoder(encoder.preprocess(tiles)).float().cpu().numpy()
            if not np.isfinite(feats).all():
                raise ModelError(
                    f"{reader.path}: tile encoder {encoder.encoder_id} produced non-finite features"
                )
            job.writer.write(idx, feats)
            done += len(idx)
            job.progress(done, n, MESSAGE)


def _extract_fast(job: _Encoding, compile: bool | None) -> None:
    """The overlapped pipeline (:func:`wsi_llava.features.fast_extract.run_fast_pipeline`)."""
    from wsi_llava.features.fast import fast_encoder
    from wsi_llava.features.fast_extract import run_fast_pipeline

    n = len(job.grid.coords)
    done = [0]

    def on_batch(k: int) -> None:
        done[0] += k
        job.progress(done[0], n, MESSAGE)

    fenc = fast_encoder(job.encoder, job.dev, compile=compile)
    stats = run_fast_pipeline(
        job.reader,
        job.grid,
        fenc,
        job.writer.write,
        batch_size=job.batch_size,
        workers=job.workers,
        cancel=job.cancel,
        on_batch=on_batch,
    )
    logger.info(
        "%s: fast featurization: %d tiles from JPEG streams, %d through the reader, compiled encoder: %s%s",
        job.reader.path,
        stats.direct_tiles,
        stats.reader_tiles,
        fenc.compiled,
        f" ({stats.reason})" if stats.reason and not stats.jpeg_direct else "",
    )
